// jax_ddl_allreduce on CUDA: the FFI handler (ffi/cuda/cuda_handler.cu), built when a CUDA
// compiler is found. The module registers it for platform "CUDA" when JAX_DDL_HAVE_CUDA.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_ddl {

XLA_FFI_DECLARE_HANDLER_SYMBOL(kAllreduceCudaInstantiate);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kAllreduceCuda);

// The FFI state type of a CUDA call site, for jax.ffi.register_ffi_type.
XLA_FFI_TypeId* CudaSiteTypeId();
const XLA_FFI_TypeInfo* CudaSiteTypeInfo();

}  // namespace jax_ddl
