// jax_ddl's own threads. Every allreduce runs on one of them while the custom call returns
// an FFI future, so XLA's executor threads never block on a peer: XLA runs independent
// calls of one program concurrently on a fixed pool, and calls that blocked there waited
// for peers queued behind them (12 independent calls on 8 devices deadlocked).
#pragma once

#include <cstdint>
#include <functional>

namespace jax_ddl {

// Runs `task` at once on a thread of its own: an idle worker, or a new one when all are
// busy. No task ever waits for a thread, so tasks that wait for each other cannot
// deadlock the pool. Workers idle for a minute exit, down to a few.
void RunOnWorker(std::function<void()> task);

// Worker threads alive now (idle or busy).
int64_t WorkerThreads();

}  // namespace jax_ddl
