// A small pool of worker threads for one parallel loop over independent items (the engine's
// chunks, the token loss's rows). Items are handed out in order from a shared counter, so the
// work stays roughly sequential in memory and a slow item never holds up the others.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>

namespace sku {

// Calls body(item, worker) for every item in [0, n_items) on min(threads, n_items) workers
// (worker in [0, workers)); returns once all have finished.
//
// With a `poll`, the calling thread only waits, calling poll() about every `interval` until the
// loop is done (the engine reports progress and checks for Ctrl-C there); poll returning false
// cancels: items not yet started are skipped and parallel_for returns false. Without a poll the
// calling thread is worker 0 and no extra thread is started for it.
//
// The first exception thrown by a body stops the loop the same way and is rethrown unchanged
// once every worker has stopped; it takes precedence over a cancellation.
bool parallel_for(size_t n_items, unsigned threads,
                  const std::function<void(size_t item, unsigned worker)>& body,
                  const std::function<bool()>& poll = nullptr,
                  std::chrono::milliseconds interval = std::chrono::milliseconds(100));

}  // namespace sku
