// Python bindings of the native engine (the only file that knows about Python): convert the
// arguments, release the GIL, run, convert the result. sku::EngineError becomes
// sku_fast._C.EngineError, a subclass of sku_fast.errors.CheckpointError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "engine.hpp"
#include "error.hpp"
#include "safetensors.hpp"

namespace py = pybind11;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

sku::DType parse_dtype(const std::string& name, const std::string& where) {
    sku::DType dtype;
    if (!sku::dtype_from_name(name, dtype)) throw sku::format_error(where + ": unknown dtype " + name);
    return dtype;
}

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

// A job tuple: (name, numel, cols, base_input, base_offset, base_dtype, out_dtype, out_offset,
// terms), a term: ("dense", weight, input, offset, dtype) or ("low_rank", weight, left, right).
sku::Job parse_job(const py::handle& item, std::vector<FloatArray>& keep_alive) {
    auto t = item.cast<py::tuple>();
    if (t.size() != 9) throw sku::internal_error("internal: a job tuple needs 9 fields");
    sku::Job job;
    job.name = t[0].cast<std::string>();
    const std::string where = "tensor \"" + job.name + "\"";
    job.numel = t[1].cast<uint64_t>();
    job.cols = t[2].cast<uint64_t>();
    job.base_input = t[3].cast<size_t>();
    job.base_offset = t[4].cast<uint64_t>();
    job.base_dtype = parse_dtype(t[5].cast<std::string>(), where);
    job.out_dtype = parse_dtype(t[6].cast<std::string>(), where);
    job.out_offset = t[7].cast<uint64_t>();
    for (const auto& term_item : t[8].cast<py::list>()) {
        auto term_tuple = term_item.cast<py::tuple>();
        sku::Term term;
        const auto kind = term_tuple[0].cast<std::string>();
        term.weight = term_tuple[1].cast<double>();
        if (kind == "dense" && term_tuple.size() == 5) {
            term.kind = sku::Term::Kind::Dense;
            term.input = term_tuple[2].cast<size_t>();
            term.offset = term_tuple[3].cast<uint64_t>();
            term.dtype = parse_dtype(term_tuple[4].cast<std::string>(), where);
        } else if (kind == "low_rank" && term_tuple.size() == 4) {
            FloatArray left = FloatArray::ensure(term_tuple[2]);
            FloatArray right = FloatArray::ensure(term_tuple[3]);
            if (!left || !right || left.ndim() != 2 || right.ndim() != 2 ||
                left.shape(1) != right.shape(0) || uint64_t(right.shape(1)) != job.cols ||
                uint64_t(left.shape(0)) * job.cols != job.numel)
                throw sku::format_error(where + ": low-rank factors do not multiply to the "
                                                "tensor's shape");
            term.kind = sku::Term::Kind::LowRank;
            term.left = left.data();
            term.right = right.data();
            term.rank = uint64_t(left.shape(1));
            keep_alive.push_back(std::move(left));
            keep_alive.push_back(std::move(right));
        } else {
            throw sku::internal_error(where + ": malformed term of kind " + kind);
        }
        job.terms.push_back(term);
    }
    return job;
}

void combine(const std::string& out_path, const py::bytes& header,
             const std::vector<std::string>& inputs, const py::list& jobs, unsigned threads,
             const py::object& progress) {
    sku::Plan plan;
    plan.out_path = out_path;
    plan.header = header;
    plan.inputs = inputs;
    plan.threads = threads;
    std::vector<FloatArray> keep_alive;
    for (const auto& item : jobs) plan.jobs.push_back(parse_job(item, keep_alive));

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
    m.doc() = "sku-fast native task-vector engine";
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
    m.def("combine", &combine, py::arg("out_path"), py::arg("header"), py::arg("inputs"),
          py::arg("jobs"), py::arg("threads"), py::arg("progress"),
          "Writes one safetensors file from tensor jobs (see sku_fast.arithmetic) with a pool of "
          "threads, the GIL released; progress(bytes_done) is called about every 100 ms.");
    m.attr("MAX_HEADER_BYTES") = sku::kMaxHeaderBytes;
}
