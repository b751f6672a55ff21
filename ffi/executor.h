// jax_ddl's own threads. A call that cannot finish at once (its peers did not all arrive
// within a short wait, or it waits on other processes) continues on one of them while the
// custom call returns a pending FFI future: XLA runs independent calls of one program
// concurrently on a fixed pool, and calls that blocked there without bound waited for
// peers queued behind them (12 independent calls on 8 devices deadlocked).
#pragma once

#include <cstdint>
#include <functional>

namespace jax_ddl {

// Runs `task` at once on a thread of its own: an idle worker, or a new one when all are
// busy. No task ever waits for a thread, so tasks that wait for each other cannot
// deadlock the pool. Workers idle for a minute exit, down to a few. Returns false (the
// task not run, and dropped) when no thread could be started for it.
bool RunOnWorker(std::function<void()> task);

// Worker threads alive now (idle or busy).
int64_t WorkerThreads();

}  // namespace jax_ddl
