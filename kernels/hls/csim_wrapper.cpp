// C-callable entry for C simulation (g++ shared library, loaded by
// fpga_service/device/csim_xrt.py through ctypes). Not part of the hardware build.
#include <mutex>

#include "hbm_decode.h"

namespace {
std::mutex run_lock;  // the kernel keeps its on-chip buffers in statics: one run at a time
}

extern "C" int hbm_decode_csim(void* const* channels, void* io, const void* meta, int n_steps,
                               int position, int token, int kv_capacity) {
    std::lock_guard<std::mutex> hold(run_lock);
#define HBM_CSIM_PORT(c) static_cast<word_t*>(channels[c]),
    hbm_decode(HBM_FOR_EACH_CHANNEL(HBM_CSIM_PORT) static_cast<word_t*>(io),
               static_cast<const word_t*>(meta), n_steps, position, token, kv_capacity);
#undef HBM_CSIM_PORT
    return 0;
}

// Which model this library was built for (the generated hbm_model.h).
extern "C" const char* hbm_decode_csim_model() { return cfg::MODEL; }
extern "C" unsigned long long hbm_decode_csim_meta_fnv() { return cfg::META_FNV; }
