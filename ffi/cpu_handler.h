// The XLA FFI handler `jax_ddl_allreduce` for platform cpu: its instantiate stage (one
// call-site state per compiled instruction) and its execute stage.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_ddl {
XLA_FFI_DECLARE_HANDLER_SYMBOL(kAllreduceCpuInstantiate);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kAllreduceCpu);
}  // namespace jax_ddl
