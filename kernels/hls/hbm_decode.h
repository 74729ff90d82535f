// hbm_decode.h: the kernel's ABI (docs/fpga-kernel-abi.md; fpga_service/device/abi.py is
// the host's copy of the same numbers) and the per-channel helper macros.
#pragma once

#include "hbm_model.h"  // generated per model: dimensions and weight offsets (cfg::)
#include "hbm_types.h"

namespace abi {
constexpr int N_CH = 32;             // HBM pseudo-channels = m_axi ports gmem0..gmem31
constexpr int VEC = 32;              // elements per KV lane / tile side
constexpr int MAX_STEPS = 1024;
constexpr uint64_t IO_MAGIC = 0x3130304F49424D48ull;
constexpr int OFF_KV_BASE = 8;       // i64[32]
constexpr int OFF_STATUS = 264;      // i64
constexpr int OFF_STEPS_DONE = 272;  // i64
constexpr int OFF_TOKENS = 288;      // i64[1024]
constexpr int OFF_LOGITS = 8480;     // f32[vocab]
constexpr int64_t STATUS_OK = 1;
constexpr int64_t STATUS_BAD_ARGS = -1;
constexpr int64_t STATUS_KV_FULL = -2;
}  // namespace abi

// The 32 channel ports as one parameter list / argument list, and X(c) for every c:
// each channel has its own port, so per-channel work is written once as a template
// on the channel number and instantiated 32 times (no run-time indexing of ports).
#define HBM_GMEM_PARAMS word_t* gmem0, word_t* gmem1, word_t* gmem2, word_t* gmem3, word_t* gmem4, word_t* gmem5, word_t* gmem6, word_t* gmem7, word_t* gmem8, word_t* gmem9, word_t* gmem10, word_t* gmem11, word_t* gmem12, word_t* gmem13, word_t* gmem14, word_t* gmem15, word_t* gmem16, word_t* gmem17, word_t* gmem18, word_t* gmem19, word_t* gmem20, word_t* gmem21, word_t* gmem22, word_t* gmem23, word_t* gmem24, word_t* gmem25, word_t* gmem26, word_t* gmem27, word_t* gmem28, word_t* gmem29, word_t* gmem30, word_t* gmem31
#define HBM_GMEM_ARGS gmem0, gmem1, gmem2, gmem3, gmem4, gmem5, gmem6, gmem7, gmem8, gmem9, gmem10, gmem11, gmem12, gmem13, gmem14, gmem15, gmem16, gmem17, gmem18, gmem19, gmem20, gmem21, gmem22, gmem23, gmem24, gmem25, gmem26, gmem27, gmem28, gmem29, gmem30, gmem31
#define HBM_FOR_EACH_CHANNEL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23) X(24) X(25) X(26) X(27) X(28) X(29) X(30) X(31)

extern "C" void hbm_decode(HBM_GMEM_PARAMS, word_t* io, const word_t* meta, int n_steps,
                           int position, int token, int kv_capacity);
