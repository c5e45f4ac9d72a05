#include "thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace sku {

bool parallel_for(size_t n_items, unsigned threads,
                  const std::function<void(size_t, unsigned)>& body,
                  const std::function<bool()>& poll, std::chrono::milliseconds interval) {
    if (n_items == 0) return true;
    const unsigned n_workers = unsigned(std::min<size_t>(std::max(threads, 1u), n_items));

    std::atomic<size_t> next{0};
    std::atomic<bool> stop{false};
    std::mutex mutex;
    std::condition_variable finished_cv;
    unsigned finished = 0;
    std::exception_ptr error;

    auto work = [&](unsigned worker) {
        try {
            while (!stop.load(std::memory_order_relaxed)) {
                const size_t item = next.fetch_add(1);
                if (item >= n_items) break;
                body(item, worker);
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(mutex);
            if (!error) error = std::current_exception();
            stop = true;
        }
        std::lock_guard<std::mutex> lock(mutex);
        ++finished;
        finished_cv.notify_all();
    };

    // Without a poll the calling thread takes worker 0's share.
    const unsigned first_thread = poll ? 0 : 1;
    std::vector<std::thread> workers;
    workers.reserve(n_workers);
    try {
        for (unsigned w = first_thread; w < n_workers; ++w) workers.emplace_back(work, w);
    } catch (...) {  // no thread could be started: stop those that were, then report it
        stop = true;
        for (auto& worker : workers) worker.join();
        throw;
    }

    bool cancelled = false;
    if (poll) {
        std::unique_lock<std::mutex> lock(mutex);
        while (finished < n_workers) {
            finished_cv.wait_for(lock, interval);
            if (finished < n_workers && !cancelled) {
                lock.unlock();
                bool go_on = false;
                try {
                    go_on = poll();
                } catch (...) {  // rethrown below, after the workers have stopped
                    std::lock_guard<std::mutex> guard(mutex);
                    if (!error) error = std::current_exception();
                }
                if (!go_on) {
                    cancelled = true;
                    stop = true;
                }
                lock.lock();
            }
        }
    } else {
        work(0);
    }
    for (auto& worker : workers) worker.join();
    if (error) std::rethrow_exception(error);
    return !cancelled;
}

}  // namespace sku
