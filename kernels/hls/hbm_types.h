// hbm_types.h: the ONE header that names the kernel's hardware types.
//
// hbm_decode.cpp never spells a Xilinx type: it uses
//   word_t      one 512-bit AXI beat of an HBM pseudo-channel port (64 bytes)
//   elem_t      the HBM storage element (fp16 `half` or fp32, fixed by HBM_ELEM_BYTES)
//   acc_t       the datapath's arithmetic/accumulator type (fp32)
//   hstream<T>  a FIFO between dataflow processes
// plus the accessors below (element i of a word, bytes of a word, math functions).
//
// Two definitions:
//   * Vitis HLS (HBM_VITIS or __SYNTHESIS__): ap_uint<512>, half, hls::stream, hls math.
//     This branch is what `make -C kernels/hls xo` compiles; it has NOT been compiled
//     here (no Xilinx tools on this machine).
//   * plain C++17 (C simulation with g++, what CI builds): a 64-byte struct, IEEE
//     fp16 <-> fp32 conversion in software (round to nearest even, as numpy/torch do),
//     and a FIFO model. Like Vitis's own csim model of hls::stream, that FIFO is an
//     unbounded std::deque: C simulation runs the processes of a dataflow region one
//     after the other, so a FIFO must hold a whole burst. It lives here, not in the kernel.
#pragma once

#include <cstdint>

#ifndef HBM_ELEM_BYTES
#error "HBM_ELEM_BYTES must be defined (hbm_model.h): 2 for fp16 images, 4 for fp32"
#endif

typedef float acc_t;

#if defined(HBM_VITIS) || defined(__SYNTHESIS__)
// ---------------------------------------------------------------- Vitis HLS types --
#include <ap_int.h>
#include <hls_half.h>
#include <hls_math.h>
#include <hls_stream.h>

typedef ap_uint<512> word_t;
template <typename T>
using hstream = hls::stream<T>;
#if HBM_ELEM_BYTES == 2
typedef half elem_t;
#else
typedef float elem_t;
#endif

inline acc_t word_elem(const word_t& w, int i) {
#pragma HLS inline
#if HBM_ELEM_BYTES == 2
    ap_uint<16> bits = w.range(16 * i + 15, 16 * i);
    half h;
    h.set_bits(bits);  // bit pattern -> half (hls_half.h)
    return (acc_t)h;
#else
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)w.range(32 * i + 31, 32 * i);
    return c.f;
#endif
}

inline void word_set_elem(word_t& w, int i, acc_t v) {
#pragma HLS inline
#if HBM_ELEM_BYTES == 2
    half h = (half)v;  // round to nearest even
    w.range(16 * i + 15, 16 * i) = h.get_bits();
#else
    union { uint32_t u; float f; } c;
    c.f = v;
    w.range(32 * i + 31, 32 * i) = c.u;
#endif
}

inline uint64_t word_u64(const word_t& w, int byte) {
#pragma HLS inline
    return (uint64_t)w.range(8 * byte + 63, 8 * byte);
}
inline void word_set_u64(word_t& w, int byte, uint64_t v) {
#pragma HLS inline
    w.range(8 * byte + 63, 8 * byte) = v;
}
inline void word_set_u32(word_t& w, int byte, uint32_t v) {
#pragma HLS inline
    w.range(8 * byte + 31, 8 * byte) = v;
}
inline uint8_t word_u8(const word_t& w, int byte) {
#pragma HLS inline
    return (uint8_t)w.range(8 * byte + 7, 8 * byte);
}
inline word_t word_zero() { return word_t(0); }

inline uint32_t f32_bits(float f) {
    union { float f; uint32_t u; } c;
    c.f = f;
    return c.u;
}

inline acc_t k_exp(acc_t x) { return hls::expf(x); }
inline acc_t k_tanh(acc_t x) { return hls::tanhf(x); }
inline acc_t k_sqrt(acc_t x) { return hls::sqrtf(x); }
inline acc_t k_pow(acc_t x, acc_t y) { return hls::powf(x, y); }
inline acc_t k_cos(acc_t x) { return hls::cosf(x); }
inline acc_t k_sin(acc_t x) { return hls::sinf(x); }

#else
// ------------------------------------------------------- plain C++ (C simulation) --
#include <cmath>
#include <cstring>
#include <deque>

struct word_t {
    uint8_t b[64];
};

template <typename T>
class hstream {
  public:
    void write(const T& v) { q_.push_back(v); }
    T read() {
        T v = q_.front();
        q_.pop_front();
        return v;
    }
    bool empty() const { return q_.empty(); }

  private:
    std::deque<T> q_;
};

#if HBM_ELEM_BYTES == 2
typedef uint16_t elem_t;  // fp16 bit pattern; widened by word_elem

inline float half_bits_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                man <<= 1;
                ++e;
            } while ((man & 0x400) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t float_to_half_bits(float f) {  // IEEE round to nearest even
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t exp = (x >> 23) & 0xff;
    uint32_t man = x & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 | (man >> 13) : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {  // fp16 subnormal or zero
        if (e < -10) return sign;
        man |= 0x800000;
        int shift = 14 - e;
        uint32_t half_man = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half_man & 1))) ++half_man;
        return (uint16_t)(sign | half_man);
    }
    uint32_t half_man = man >> 13;
    uint32_t rem = man & 0x1fff;
    uint32_t out = ((uint32_t)e << 10) | half_man;
    if (rem > 0x1000 || (rem == 0x1000 && (half_man & 1))) ++out;  // may carry into exp
    return (uint16_t)(sign | out);
}

inline acc_t word_elem(const word_t& w, int i) {
    uint16_t h;
    std::memcpy(&h, w.b + 2 * i, 2);
    return half_bits_to_float(h);
}
inline void word_set_elem(word_t& w, int i, acc_t v) {
    uint16_t h = float_to_half_bits(v);
    std::memcpy(w.b + 2 * i, &h, 2);
}
#else
typedef float elem_t;
inline acc_t word_elem(const word_t& w, int i) {
    float f;
    std::memcpy(&f, w.b + 4 * i, 4);
    return f;
}
inline void word_set_elem(word_t& w, int i, acc_t v) { std::memcpy(w.b + 4 * i, &v, 4); }
#endif

inline uint64_t word_u64(const word_t& w, int byte) {
    uint64_t v;
    std::memcpy(&v, w.b + byte, 8);
    return v;
}
inline void word_set_u64(word_t& w, int byte, uint64_t v) { std::memcpy(w.b + byte, &v, 8); }
inline void word_set_u32(word_t& w, int byte, uint32_t v) { std::memcpy(w.b + byte, &v, 4); }
inline uint8_t word_u8(const word_t& w, int byte) { return w.b[byte]; }
inline word_t word_zero() {
    word_t w;
    std::memset(w.b, 0, sizeof w.b);
    return w;
}

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline acc_t k_exp(acc_t x) { return std::exp(x); }
inline acc_t k_tanh(acc_t x) { return std::tanh(x); }
inline acc_t k_sqrt(acc_t x) { return std::sqrt(x); }
inline acc_t k_pow(acc_t x, acc_t y) { return std::pow(x, y); }
inline acc_t k_cos(acc_t x) { return std::cos(x); }
inline acc_t k_sin(acc_t x) { return std::sin(x); }
#endif

// Elements of the HBM storage type in one 512-bit word.
constexpr int EPW = 64 / HBM_ELEM_BYTES;
