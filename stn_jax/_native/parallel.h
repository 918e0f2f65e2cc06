// ParallelFor over XLA's intra-op thread pool, shared by the native kernels.
#ifndef STN_JAX_NATIVE_PARALLEL_H_
#define STN_JAX_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace stn {

// Runs fn(task) for task in [0, n_tasks) on the caller and the pool. The
// caller takes tasks too and waits only for tasks already started, so it
// never waits on work queued behind it (no deadlock on a busy pool); helpers
// that start late find nothing left and touch no caller state.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n_tasks, const Fn& fn) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n_tasks) - 1;
  if (helpers <= 0) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n_tasks, &fn]() {
    for (;;) {
      const int64_t t = state->next.fetch_add(1);
      if (t >= n_tasks) return;
      fn(t);
      if (state->done.fetch_add(1) + 1 == n_tasks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state, n_tasks, work]() {
      if (state->next.load() < n_tasks) work();
    });
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n_tasks; });
}

}  // namespace stn

#endif  // STN_JAX_NATIVE_PARALLEL_H_
