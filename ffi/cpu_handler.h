// The XLA FFI handlers for platform cpu: `jax_ddl_allreduce`, its instantiate stage (one
// call-site state per compiled instruction) and its execute stage, and `jax_ddl_gate`.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_ddl {
XLA_FFI_DECLARE_HANDLER_SYMBOL(kAllreduceCpuInstantiate);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kAllreduceCpu);
// `jax_ddl_gate` for platform cpu: results alias operands; an ordering point for XLA.
XLA_FFI_DECLARE_HANDLER_SYMBOL(kGateCpu);
}  // namespace jax_ddl
