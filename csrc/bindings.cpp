// Python bindings of the native engine (the only file that knows about Python): convert the
// arguments, release the GIL, run, convert the result. sku::EngineError becomes
// sku_fast._C.EngineError, a subclass of sku_fast.errors.CheckpointError with a `kind`.
// The engine's jobs cross as small typed classes (_C.Job, _C.DenseTerm, _C.LowRankTerm).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "cpu_features.hpp"
#include "engine.hpp"
#include "error.hpp"
#include "safetensors.hpp"
#include "token_loss.hpp"

namespace py = pybind11;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::dict header_to_dict(const sku::Header& header) {
    py::dict metadata;
    for (const auto& [key, value] : header.metadata) metadata[py::str(key)] = py::str(value);
    py::list tensors;
    for (const auto& t : header.tensors) {
        py::tuple shape(t.shape.size());
        for (size_t i = 0; i < t.shape.size(); ++i) shape[i] = py::int_(t.shape[i]);
        tensors.append(py::make_tuple(t.name, sku::dtype_name(t.dtype), shape, t.begin, t.end));
    }
    py::dict out;
    out["data_start"] = header.data_start;
    out["file_size"] = header.file_size;
    out["metadata"] = metadata;
    out["tensors"] = tensors;
    return out;
}

sku::DType dtype_named(const std::string& name) {
    sku::DType dtype;
    if (!sku::dtype_from_name(name, dtype))
        throw py::value_error("unknown dtype " + py::repr(py::str(name)).cast<std::string>());
    return dtype;
}

std::string repr_text(const py::handle& value) { return py::repr(value).cast<std::string>(); }

std::string shape_text(const FloatArray& a) {
    std::string text = "float32[";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) text += (i ? ", " : "") + std::to_string(a.shape(i));
    return text + "]";
}

// _C.DenseTerm: acc += weight * (tuned - base), the tuned tensor read from inputs[input] at
// absolute byte `offset`, stored as `dtype`.
struct DenseTerm {
    double weight;
    size_t input;
    uint64_t offset;
    sku::DType dtype;

    std::string repr() const {
        return "DenseTerm(weight=" + repr_text(py::float_(weight)) +
               ", input=" + std::to_string(input) + ", offset=" + std::to_string(offset) +
               ", dtype='" + sku::dtype_name(dtype) + "')";
    }
};

// _C.LowRankTerm: acc += weight * (left @ right), left [rows, rank] and right [rank, cols] fp32
// (converted to C-contiguous float32 if they are not). Holding the arrays keeps them alive for
// the engine, which reads them without the GIL.
struct LowRankTerm {
    double weight;
    FloatArray left;
    FloatArray right;

    std::string repr() const {
        return "LowRankTerm(weight=" + repr_text(py::float_(weight)) +
               ", left=" + shape_text(left) + ", right=" + shape_text(right) + ")";
    }
};

using AnyTerm = std::variant<DenseTerm, LowRankTerm>;

// _C.Job: one tensor of the output, base + the terms in order, written at `out_offset`.
struct Job {
    sku::Job job;  // everything but the low-rank factors' pointers, filled in by combine
    std::vector<AnyTerm> terms;

    std::string repr() const {
        std::string text = "Job(name=" + repr_text(py::str(job.name)) +
                           ", numel=" + std::to_string(job.numel) +
                           ", cols=" + std::to_string(job.cols) +
                           ", base_input=" + std::to_string(job.base_input) +
                           ", base_offset=" + std::to_string(job.base_offset) +
                           ", base_dtype='" + sku::dtype_name(job.base_dtype) +
                           "', out_dtype='" + sku::dtype_name(job.out_dtype) +
                           "', out_offset=" + std::to_string(job.out_offset) +
                           (job.base_weight != 1.0 ? ", base_weight=" + repr_text(py::float_(job.base_weight)) : "") +
                           ", terms=[";
        for (size_t i = 0; i < terms.size(); ++i)
            text += (i ? ", " : "") + std::visit([](const auto& t) { return t.repr(); }, terms[i]);
        return text + "])";
    }
};

Job make_job(const std::string& name, uint64_t numel, uint64_t cols, size_t base_input,
             uint64_t base_offset, const std::string& base_dtype, const std::string& out_dtype,
             uint64_t out_offset, std::vector<AnyTerm> terms, double base_weight) {
    Job out;
    sku::Job& job = out.job;
    job.name = name;
    job.numel = numel;
    job.cols = cols;
    job.base_input = base_input;
    job.base_offset = base_offset;
    job.base_dtype = dtype_named(base_dtype);
    job.out_dtype = dtype_named(out_dtype);
    job.out_offset = out_offset;
    if (!std::isfinite(base_weight))
        throw sku::format_error("tensor \"" + name + "\": base_weight must be finite");
    job.base_weight = base_weight;
    for (const AnyTerm& any : terms) {
        sku::Term term;
        if (const auto* dense = std::get_if<DenseTerm>(&any)) {
            term.kind = sku::Term::Kind::Dense;
            term.weight = dense->weight;
            term.input = dense->input;
            term.offset = dense->offset;
            term.dtype = dense->dtype;
        } else {
            const auto& low_rank = std::get<LowRankTerm>(any);
            const FloatArray& left = low_rank.left;
            const FloatArray& right = low_rank.right;
            if (left.ndim() != 2 || right.ndim() != 2 || left.shape(1) != right.shape(0) ||
                uint64_t(right.shape(1)) != cols || uint64_t(left.shape(0)) * cols != numel)
                throw sku::format_error("tensor \"" + name + "\": low-rank factors " +
                                        shape_text(left) + " @ " + shape_text(right) +
                                        " do not multiply to the tensor's shape (" +
                                        std::to_string(numel) + " elements in rows of " +
                                        std::to_string(cols) + ")");
            term.kind = sku::Term::Kind::LowRank;
            term.weight = low_rank.weight;
            term.rank = uint64_t(left.shape(1));
        }
        job.terms.push_back(term);
    }
    out.terms = std::move(terms);
    return out;
}

void combine(const std::string& out_path, const py::bytes& header,
             const std::vector<std::string>& inputs, const std::vector<py::object>& jobs,
             unsigned threads, const py::object& progress) {
    sku::Plan plan;
    plan.out_path = out_path;
    plan.header = header;
    plan.inputs = inputs;
    plan.threads = threads;
    // `jobs` holds a reference to every _C.Job, and each job to its factors, until we return
    for (const py::object& item : jobs) {
        if (!py::isinstance<Job>(item))
            throw py::type_error("jobs must be _C.Job objects, got " +
                                 repr_text(py::type::of(item)));
        const Job& spec = item.cast<const Job&>();
        sku::Job job = spec.job;
        for (size_t k = 0; k < job.terms.size(); ++k) {
            if (const auto* low_rank = std::get_if<LowRankTerm>(&spec.terms[k])) {
                job.terms[k].left = low_rank->left.data();
                job.terms[k].right = low_rank->right.data();
            }
        }
        plan.jobs.push_back(std::move(job));
    }

    // A Python exception raised by the callback (e.g. KeyboardInterrupt) cancels the run and is
    // re-raised once the workers have stopped.
    std::optional<py::error_already_set> callback_error;
    sku::Progress report = [&](uint64_t done) {
        py::gil_scoped_acquire gil;
        if (callback_error) return false;
        try {
            if (PyErr_CheckSignals() != 0) throw py::error_already_set();
            if (!progress.is_none()) progress(done);
        } catch (py::error_already_set& e) {
            callback_error = std::move(e);
            return false;
        }
        return true;
    };
    try {
        py::gil_scoped_release release;
        sku::combine(plan, report);
    } catch (const sku::EngineError&) {
        if (callback_error) throw std::move(*callback_error);
        throw;
    }
    if (callback_error) throw std::move(*callback_error);
}

// The token loss takes raw addresses (tensor.data_ptr()) so that this file needs no torch:
// sku_fast/native_token_loss.py checks the tensors and keeps them alive for the call.
void token_loss_rows(uintptr_t logits, const std::string& logits_dtype, int64_t rows,
                     int64_t vocab, int64_t logits_stride, uintptr_t labels,
                     std::optional<uintptr_t> ref_logits, const std::string& ref_dtype,
                     int64_t ref_stride, uintptr_t ce_weight, uintptr_t kl_weight,
                     int64_t ignore_index, std::optional<uintptr_t> grad,
                     const std::string& grad_dtype, int64_t grad_stride, uintptr_t loss,
                     unsigned threads) {
    sku::TokenLossArgs args;
    args.rows = rows;
    args.vocab = vocab;
    args.logits = reinterpret_cast<const void*>(logits);
    args.logits_dtype = dtype_named(logits_dtype);
    args.logits_stride = logits_stride;
    args.labels = reinterpret_cast<const int64_t*>(labels);
    if (ref_logits) {
        args.ref = reinterpret_cast<const void*>(*ref_logits);
        args.ref_dtype = dtype_named(ref_dtype);
        args.ref_stride = ref_stride;
    }
    args.ce_weight = reinterpret_cast<const float*>(ce_weight);
    args.kl_weight = reinterpret_cast<const float*>(kl_weight);
    args.ignore_index = ignore_index;
    if (grad) {
        args.grad = reinterpret_cast<void*>(*grad);
        args.grad_dtype = dtype_named(grad_dtype);
        args.grad_stride = grad_stride;
    }
    args.loss = reinterpret_cast<float*>(loss);
    args.threads = threads;
    py::gil_scoped_release release;
    sku::token_loss_rows(args);
}

// sku::EngineError -> _C.EngineError(message) with .kind = "format" | "io" | "memory" |
// "cancelled" | "internal". The type lives as long as the process (a module is never unloaded).
PyObject* g_engine_error = nullptr;

void translate_engine_error(std::exception_ptr p) {
    try {
        if (p) std::rethrow_exception(p);
    } catch (const sku::EngineError& e) {
        py::object error = py::reinterpret_borrow<py::object>(g_engine_error)(e.what());
        error.attr("kind") = sku::error_kind_name(e.kind());
        PyErr_SetObject(g_engine_error, error.ptr());
    }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "sku-fast native core: the streaming task-vector engine and the CPU token loss";
    py::object base = py::module_::import("sku_fast.errors").attr("CheckpointError");
    g_engine_error = PyErr_NewExceptionWithDoc(
        "sku_fast._C.EngineError",
        "A checkpoint could not be read, combined or written; the message names the file, the "
        "tensor and the problem. `kind` is one of format, io, memory, cancelled, internal.",
        base.ptr(), nullptr);
    if (g_engine_error == nullptr) throw py::error_already_set();
    // the kind of an EngineError raised from Python code
    PyObject_SetAttrString(g_engine_error, "kind", py::str("internal").ptr());
    m.attr("EngineError") = py::handle(g_engine_error);
    py::register_exception_translator(&translate_engine_error);

    m.def(
        "read_header",
        [](const std::string& path) {
            sku::Header header;
            {
                py::gil_scoped_release release;
                header = sku::read_header(path);
            }
            return header_to_dict(header);
        },
        py::arg("path"),
        "Reads and validates a safetensors header. Returns {data_start, file_size, metadata, "
        "tensors: [(name, dtype, shape, begin, end)] in data order}; offsets are relative to "
        "data_start.");
    py::class_<DenseTerm>(m, "DenseTerm",
                          "acc += weight * (tuned - base); the tuned tensor is read from "
                          "inputs[input] at absolute byte offset `offset`, stored as `dtype`.")
        .def(py::init([](double weight, size_t input, uint64_t offset, const std::string& dtype) {
                 return DenseTerm{weight, input, offset, dtype_named(dtype)};
             }),
             py::kw_only(), py::arg("weight"), py::arg("input"), py::arg("offset"),
             py::arg("dtype"))
        .def_readonly("weight", &DenseTerm::weight)
        .def_readonly("input", &DenseTerm::input)
        .def_readonly("offset", &DenseTerm::offset)
        .def_property_readonly("dtype", [](const DenseTerm& t) { return sku::dtype_name(t.dtype); })
        .def("__repr__", &DenseTerm::repr);
    py::class_<LowRankTerm>(m, "LowRankTerm",
                            "acc += weight * (left @ right) for left [rows, rank] and right "
                            "[rank, cols], as C-contiguous float32 (converted if need be).")
        .def(py::init([](double weight, FloatArray left, FloatArray right) {
                 return LowRankTerm{weight, std::move(left), std::move(right)};
             }),
             py::kw_only(), py::arg("weight"), py::arg("left"), py::arg("right"))
        .def_readonly("weight", &LowRankTerm::weight)
        .def_readonly("left", &LowRankTerm::left)
        .def_readonly("right", &LowRankTerm::right)
        .def("__repr__", &LowRankTerm::repr);
    py::class_<Job>(m, "Job",
                    "One output tensor: numel elements (rows of `cols`) of the base read from "
                    "inputs[base_input] at byte base_offset, times base_weight, plus the terms "
                    "in order, rounded to out_dtype and written at byte out_offset.")
        .def(py::init(&make_job), py::kw_only(), py::arg("name"), py::arg("numel"),
             py::arg("cols") = 1, py::arg("base_input"), py::arg("base_offset"),
             py::arg("base_dtype"), py::arg("out_dtype"), py::arg("out_offset"),
             py::arg("terms") = std::vector<AnyTerm>(), py::arg("base_weight") = 1.0)
        .def_property_readonly("name", [](const Job& j) { return j.job.name; })
        .def_property_readonly("numel", [](const Job& j) { return j.job.numel; })
        .def_property_readonly("cols", [](const Job& j) { return j.job.cols; })
        .def_property_readonly("base_input", [](const Job& j) { return j.job.base_input; })
        .def_property_readonly("base_offset", [](const Job& j) { return j.job.base_offset; })
        .def_property_readonly("base_dtype",
                               [](const Job& j) { return sku::dtype_name(j.job.base_dtype); })
        .def_property_readonly("out_dtype",
                               [](const Job& j) { return sku::dtype_name(j.job.out_dtype); })
        .def_property_readonly("out_offset", [](const Job& j) { return j.job.out_offset; })
        .def_property_readonly("base_weight", [](const Job& j) { return j.job.base_weight; })
        .def_property_readonly("terms", [](const Job& j) { return j.terms; })
        .def("__repr__", &Job::repr);

    m.def("combine", &combine, py::arg("out_path"), py::arg("header"), py::arg("inputs"),
          py::arg("jobs"), py::arg("threads"), py::arg("progress"),
          "Writes one safetensors file from a list of _C.Job (see sku_fast.arithmetic) with a "
          "pool of threads, the GIL released; progress(bytes_done) is called about every "
          "100 ms.");
    m.def("token_loss_rows", &token_loss_rows, py::kw_only(), py::arg("logits"),
          py::arg("logits_dtype"), py::arg("rows"), py::arg("vocab"), py::arg("logits_stride"),
          py::arg("labels"), py::arg("ref_logits") = py::none(), py::arg("ref_dtype") = "F32",
          py::arg("ref_stride") = 0, py::arg("ce_weight"), py::arg("kl_weight"),
          py::arg("ignore_index"), py::arg("grad") = py::none(), py::arg("grad_dtype") = "F32",
          py::arg("grad_stride") = 0, py::arg("loss"), py::arg("threads") = 1,
          "Per-row fused token loss a*CE(z, y) + b*KL(softmax(z') || softmax(z)) and its "
          "gradient on the CPU, the GIL released. Buffers are raw addresses: logits, "
          "ref_logits and grad [rows, vocab] (F32/BF16/F16, rows `*_stride` elements apart, "
          "grad may be the logits buffer), labels int64 [rows], ce_weight, kl_weight and the "
          "output loss fp32 [rows]. ValueError with the numbers for bad sizes, dtypes or "
          "labels (see sku_fast.native_token_loss for the checked Python entry point).");
    m.def("vector_level", &sku::vector_level,
          "The vector instruction set the native loops run with: 0 portable, 1 AVX2 (+FMA, "
          "F16C), 2 AVX-512. The best the CPU has, capped by SKU_FAST_ISA=sse2|avx2.");
    m.def("set_vector_level", &sku::set_vector_level, py::arg("level"),
          "Test hook: run at min(level, the CPU's best) from now on; returns that level. Every "
          "level gives the same bits.");
    m.attr("MAX_HEADER_BYTES") = sku::kMaxHeaderBytes;
    py::dict itemsizes;
    py::list floats;
    for (const sku::DTypeInfo& info : sku::kDTypes) {
        itemsizes[py::str(info.name)] = info.size;
        if (info.arithmetic) floats.append(info.name);
    }
    m.attr("DTYPES") = itemsizes;  // {safetensors name: bytes per element}, every dtype
    m.attr("FLOAT_DTYPES") = py::tuple(floats);  // the ones the engine does arithmetic on
}
