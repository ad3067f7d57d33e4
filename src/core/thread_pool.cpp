// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "core/check.h"

namespace kvcache {
namespace {
// How long an idle worker polls for new work before it sleeps on the condition variable.
constexpr auto kSpinTime = std::chrono::microseconds(50);
}  // namespace

struct ThreadPool::Impl {
  int num_threads = 1;
  std::vector<std::thread> workers;

  std::mutex mu;
  std::condition_variable wake;
  bool stop = false;                    // guarded by mu
  std::atomic<uint64_t> generation{0};  // bumped once per parallel_for
  std::atomic<int> sleepers{0};         // workers blocked on `wake`
  std::atomic<int> remaining{0};        // worker ranges not finished yet
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0;

  void run_range(int part) const {
    const int64_t begin = n * part / num_threads;
    const int64_t end = n * (part + 1) / num_threads;
    if (begin < end) (*fn)(begin, end);
  }

  void worker_loop(int part) {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
      while (generation.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < spin_until) {
      }
      if (generation.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu);
        sleepers.fetch_add(1, std::memory_order_relaxed);
        wake.wait(lock, [&] { return stop || generation.load(std::memory_order_acquire) != seen; });
        sleepers.fetch_sub(1, std::memory_order_relaxed);
        if (stop) return;
      }
      seen = generation.load(std::memory_order_acquire);
      run_range(part);
      remaining.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
};

ThreadPool::ThreadPool(int num_threads) : impl_(std::make_unique<Impl>()) {
  KV_CHECK(num_threads >= 1);
  impl_->num_threads = num_threads;
  for (int part = 1; part < num_threads; ++part) {
    impl_->workers.emplace_back([this, part] { impl_->worker_loop(part); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop = true;
  }
  impl_->wake.notify_all();
  for (std::thread& t : impl_->workers) t.join();
}

int ThreadPool::num_threads() const { return impl_->num_threads; }

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  Impl& p = *impl_;
  if (p.num_threads == 1 || n == 1) {
    fn(0, n);
    return;
  }
  p.fn = &fn;
  p.n = n;
  p.remaining.store(p.num_threads - 1, std::memory_order_relaxed);
  {
    // Publishing under the mutex means a worker about to sleep either sees the new generation
    // in its wait predicate or is already waiting when notify_all runs.
    std::lock_guard<std::mutex> lock(p.mu);
    p.generation.fetch_add(1, std::memory_order_release);
  }
  if (p.sleepers.load(std::memory_order_relaxed) > 0) p.wake.notify_all();
  p.run_range(0);
  while (p.remaining.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

}  // namespace kvcache
