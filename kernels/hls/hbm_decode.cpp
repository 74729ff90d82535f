// hbm_decode: the U55C decode kernel of docs/fpga-kernel-abi.md, in Vitis HLS C++.
//
// One run decodes n_steps tokens of one request (batch 1). Every weight and every K/V
// element comes from the 32 HBM pseudo-channel ports, laid out as docs/hbm-layout.md
// says (kernels/hbm_layout.py, kernels/weight_table.py); each step appends its K/V row
// into the request's tiles. Microarchitecture and schedule: docs/fpga-kernel.md.
//
// Structure (per decode step, per layer):
//   matvec   one dataflow region: x is broadcast into 32 FIFOs; 32 burst readers (one per
//            m_axi port / pseudo-channel) stream that channel's rows of W (its output
//            slice: docs/hbm-layout.md "Weights") into 32 MAC units of EPW lanes each;
//            a gather process writes the slices into the on-chip output vector.
//   kv       each channel writes the new token's K row / V column into its own lanes.
//   attention two dataflow regions (q.K partial scores per channel -> summed scores;
//            probabilities broadcast -> p.V per channel) around a serial softmax.
//   norms, residuals, activations, RoPE and argmax run serially on on-chip vectors.
// Model dimensions are compile-time constants (hbm_model.h, generated per model by
// kernels/hls_build.py), so every loop has a fixed bound; loops over the live context
// run to a fixed maximum and exit early.
#include "hbm_decode.h"

namespace {

constexpr int NCH = abi::N_CH;
constexpr int VEC = abi::VEC;
constexpr int EB = HBM_ELEM_BYTES;
constexpr bool GPT2 = cfg::FAMILY == cfg::FAMILY_GPT2;
constexpr int D = cfg::D;        // model width (= query width n_heads * head_dim)
constexpr int F = cfg::F;        // MLP width
constexpr int H = cfg::H;        // query heads
constexpr int HKV = cfg::HKV;    // KV heads
constexpr int HD = cfg::HD;      // head dim
constexpr int KVD = cfg::KVD;    // KV row width of the model
constexpr int KVP = cfg::KVD_PAD;  // KV row width in HBM: whole 32-element lanes
constexpr int VOCAB = cfg::VOCAB;
constexpr int MAX_T = cfg::POS;  // context bound: max positions
constexpr int GROUP = H / HKV;   // query heads per KV head (GQA)
constexpr int N_LANES = KVP / VEC;
constexpr int LPC = (N_LANES + NCH - 1) / NCH;  // lanes of the fullest channel
constexpr int TILE_WORDS = VEC * VEC * EB / 64;  // one 32x32 tile
constexpr int ROW_WORDS = VEC * EB / 64;         // one tile row (32 elements)
constexpr int MAX_BLOCKS = (MAX_T + VEC - 1) / VEC;
constexpr int ILV = 8;  // interleaved partial sums per MAC unit (>= fp32 adder latency)

static_assert(KVP % VEC == 0 && KVP >= KVD, "KV rows are whole 32-element lanes");
static_assert(D >= EPW && F >= EPW, "a 512-bit word spans at most two matrix rows");
static_assert(H % HKV == 0 && D == H * HD, "query width is n_heads * head_dim");

constexpr int cmin(int a, int b) { return a < b ? a : b; }
// docs/hbm-layout.md: a matrix's rows are split over the channels in whole 32-row vectors
constexpr int rows_per_ch(int out) { return VEC * (((out + VEC - 1) / VEC + NCH - 1) / NCH); }
constexpr int row_first(int out, int c) { return cmin(c * rows_per_ch(out), out); }
constexpr int row_count(int out, int c) {
    return cmin((c + 1) * rows_per_ch(out), out) - row_first(out, c);
}
// ... and the KV lanes in contiguous blocks, the same rule
constexpr int lane_first(int c) { return cmin(c * LPC, N_LANES); }
constexpr int lane_count(int c) { return cmin((c + 1) * LPC, N_LANES) - lane_first(c); }
constexpr int words_of(int elems) { return (int)(((long)elems * EB + 63) / 64); }

// ------------------------------------------------------------------ vectors ---------
// Read n elements starting `skip` elements into word `word` of a port.
template <int N>
void load_elems(const word_t* g, uint32_t word, int skip, acc_t out[N]) {
    const int nw = (skip + N + EPW - 1) / EPW;
    for (int w = 0; w < (N + 2 * EPW - 2) / EPW; ++w) {
#pragma HLS pipeline II = 1
        if (w >= nw) break;
        const word_t v = g[word + w];
        for (int j = 0; j < EPW; ++j) {
#pragma HLS unroll
            const int i = w * EPW + j - skip;
            if (i >= 0 && i < N) out[i] = word_elem(v, j);
        }
    }
}

// Row `row` of a split matrix (embedding table) from the channel that holds it.
template <int OUT, int N>
void read_row(HBM_GMEM_PARAMS, uint32_t tensor_word, int row, acc_t out[N]) {
    const int c = row / rows_per_ch(OUT);
    const long elem = (long)(row - c * rows_per_ch(OUT)) * N;
    const uint32_t word = tensor_word + (uint32_t)(elem / EPW);
    const int skip = (int)(elem % EPW);
    switch (c) {
#define HBM_ROW_CASE(ch) \
    case ch:             \
        load_elems<N>(gmem##ch, word, skip, out); \
        break;
        HBM_FOR_EACH_CHANNEL(HBM_ROW_CASE)
#undef HBM_ROW_CASE
        default:
            break;
    }
}

// LayerNorm (GPT-2) or RMSNorm (Llama); gain and bias are replicated vectors, read from
// channel 0's copy.
void norm(const word_t* g0, uint32_t w_word, uint32_t b_word, const acc_t x[D], acc_t y[D]) {
    acc_t w[D], b[D];
    load_elems<D>(g0, w_word, 0, w);
    if (GPT2) load_elems<D>(g0, b_word, 0, b);
    acc_t mean = 0, var = 0;
    if (GPT2) {
        for (int i = 0; i < D; ++i) mean += x[i];
        mean /= D;
        for (int i = 0; i < D; ++i) var += (x[i] - mean) * (x[i] - mean);
        var /= D;
    } else {
        for (int i = 0; i < D; ++i) var += x[i] * x[i];
        var /= D;
    }
    const acc_t inv = 1.0f / k_sqrt(var + (acc_t)cfg::EPS);
    for (int i = 0; i < D; ++i) {
#pragma HLS pipeline II = 1
        y[i] = GPT2 ? (x[i] - mean) * inv * w[i] + b[i] : w[i] * (x[i] * inv);
    }
}

// ------------------------------------------------------------------ matvec ----------
template <int IN>
void mv_broadcast(const acc_t x[IN], hstream<acc_t> xs[NCH]) {
    for (int i = 0; i < IN; ++i) {
#pragma HLS pipeline II = 1
        const acc_t v = x[i];
        for (int c = 0; c < NCH; ++c) {
#pragma HLS unroll
            xs[c].write(v);
        }
    }
}

// Channel c's burst reader: its bias slice (if any), then its rows of W, one word a cycle.
template <int OUT, int IN>
void mv_read(const word_t* g, int c, uint32_t w_word, uint32_t b_word, bool bias,
             hstream<word_t>& ws, hstream<word_t>& bs) {
    const int rows = row_count(OUT, c);
    if (bias) {
        const uint32_t b0 = b_word + (uint32_t)(row_first(OUT, c) * EB / 64);
        for (int w = 0; w < words_of(rows_per_ch(OUT)); ++w) {
#pragma HLS pipeline II = 1
            if (w >= words_of(rows)) break;
            bs.write(g[b0 + w]);
        }
    }
    const int nw = words_of(rows * IN);
    for (int w = 0; w < words_of(rows_per_ch(OUT) * IN); ++w) {
#pragma HLS pipeline II = 1
        if (w >= nw) break;
        ws.write(g[w_word + w]);
    }
}

// Channel c's MAC unit: EPW multipliers and two adder trees per word (a word holds the
// end of one row and the start of the next when IN is not a multiple of EPW); ILV
// interleaved partial sums hide the adder latency; one output per row.
template <int OUT, int IN>
void mv_mac(int c, bool bias, hstream<word_t>& ws, hstream<word_t>& bs, hstream<acc_t>& xs,
            hstream<acc_t>& ys) {
    constexpr int RMAX = rows_per_ch(OUT);
    acc_t xl[IN];
#pragma HLS array_partition variable = xl cyclic factor = EPW
    acc_t bl[RMAX];
    acc_t part[ILV];
#pragma HLS array_partition variable = part complete
    for (int i = 0; i < IN; ++i) {
#pragma HLS pipeline II = 1
        xl[i] = xs.read();
    }
    const int rows = row_count(OUT, c);
    if (rows == 0) return;
    for (int w = 0; w < words_of(RMAX); ++w) {
        if (w >= words_of(rows)) break;
        const word_t v = bias ? bs.read() : word_zero();
        for (int j = 0; j < EPW; ++j) {
#pragma HLS unroll
            if (w * EPW + j < rows) bl[w * EPW + j] = word_elem(v, j);
        }
    }
    for (int k = 0; k < ILV; ++k) part[k] = 0;
    int col = 0, row = 0;
    const int nw = words_of(rows * IN);
    for (int w = 0; w < words_of(RMAX * IN); ++w) {
#pragma HLS pipeline II = 1
#pragma HLS dependence variable = part type = inter distance = ILV true
        if (w >= nw) break;
        const word_t v = ws.read();
        acc_t lo = 0, hi = 0;
        for (int j = 0; j < EPW; ++j) {
#pragma HLS unroll
            const int cj = col + j;
            const bool next = cj >= IN;
            const acc_t p = word_elem(v, j) * xl[next ? cj - IN : cj];
            if (next) hi += p;
            else lo += p;
        }
        part[w % ILV] += lo;
        col += EPW;
        if (col >= IN) {  // row finished: reduce the partial sums
            acc_t s = 0;
            for (int k = 0; k < ILV; ++k) {
#pragma HLS unroll
                s += part[k];
                part[k] = 0;
            }
            if (row < rows) ys.write(bias ? s + bl[row] : s);
            ++row;
            col -= IN;
            part[(w + 1) % ILV] = hi;
        }
    }
}

template <int OUT>
void mv_gather(hstream<acc_t> ys[NCH], acc_t y[OUT]) {
    for (int c = 0; c < NCH; ++c) {
        for (int r = 0; r < rows_per_ch(OUT); ++r) {
#pragma HLS pipeline II = 1
            if (r >= row_count(OUT, c)) break;
            y[row_first(OUT, c) + r] = ys[c].read();
        }
    }
}

// y[OUT] = W x (+ b): all 32 channels stream their rows of W in parallel.
template <int OUT, int IN>
void matvec(HBM_GMEM_PARAMS, uint32_t w_word, uint32_t b_word, bool bias, const acc_t x[IN],
            acc_t y[OUT]) {
#pragma HLS dataflow
    hstream<acc_t> xs[NCH];
    hstream<word_t> ws[NCH];
    hstream<word_t> bs[NCH];
    hstream<acc_t> ys[NCH];
#pragma HLS stream variable = ws depth = 64
#pragma HLS stream variable = xs depth = IN
#pragma HLS stream variable = ys depth = rows_per_ch(OUT)  // gather reads channel by channel
    mv_broadcast<IN>(x, xs);
#define HBM_MV_READ(ch) mv_read<OUT, IN>(gmem##ch, ch, w_word, b_word, bias, ws[ch], bs[ch]);
    HBM_FOR_EACH_CHANNEL(HBM_MV_READ)
#undef HBM_MV_READ
#define HBM_MV_MAC(ch) mv_mac<OUT, IN>(ch, bias, ws[ch], bs[ch], xs[ch], ys[ch]);
    HBM_FOR_EACH_CHANNEL(HBM_MV_MAC)
#undef HBM_MV_MAC
    mv_gather<OUT>(ys, y);
}

// ------------------------------------------------------------------ KV --------------
// Append token `pos`: row pos%32 of block pos/32 in each of channel c's K tiles (one
// word per lane for fp16), column pos%32 of its V tiles (dim-major: 32 read-modify-writes).
// Elements of pad lanes (KVD..KVP) are written as zeros.
void kv_append_ch(word_t* g, int c, uint32_t k_word, uint32_t v_word, int pos,
                  const acc_t k[KVD], const acc_t v[KVD]) {
    const int lf = lane_first(c), lc = lane_count(c);
    const int blk = pos / VEC, r = pos % VEC;
    for (int i = 0; i < LPC; ++i) {
        if (i >= lc) break;
        const uint32_t tile = (uint32_t)(blk * lc + i) * TILE_WORDS;
        for (int w = 0; w < ROW_WORDS; ++w) {
#pragma HLS pipeline II = 1
            word_t out = word_zero();
            for (int j = 0; j < EPW; ++j) {
#pragma HLS unroll
                const int e = (lf + i) * VEC + w * EPW + j;
                word_set_elem(out, j, e < KVD ? k[e] : (acc_t)0);
            }
            g[k_word + tile + (uint32_t)(r * ROW_WORDS + w)] = out;
        }
        for (int d = 0; d < VEC; ++d) {
#pragma HLS pipeline II = 2
            const int flat = d * VEC + r;
            const uint32_t a = v_word + tile + (uint32_t)(flat / EPW);
            const int e = (lf + i) * VEC + d;
            word_t cur = g[a];
            word_set_elem(cur, flat % EPW, e < KVD ? v[e] : (acc_t)0);
            g[a] = cur;
        }
    }
}

void kv_append(HBM_GMEM_PARAMS, const uint32_t kw[NCH], const uint32_t vw[NCH], int pos,
               const acc_t k[KVD], const acc_t v[KVD]) {
#define HBM_KV_APPEND(ch) \
    if (lane_count(ch) > 0) kv_append_ch(gmem##ch, ch, kw[ch], vw[ch], pos, k, v);
    HBM_FOR_EACH_CHANNEL(HBM_KV_APPEND)
#undef HBM_KV_APPEND
}

// ------------------------------------------------------------------ attention -------
// The live tiles of a channel are one contiguous range ([block][lane]): one burst.
void tile_read(const word_t* g, int c, uint32_t base, int nb, hstream<word_t>& s) {
    const int n = nb * lane_count(c) * TILE_WORDS;
    for (int w = 0; w < MAX_BLOCKS * LPC * TILE_WORDS; ++w) {
#pragma HLS pipeline II = 1
        if (w >= n) break;
        s.write(g[base + w]);
    }
}

// Partial scores of channel c: for every (block, lane slot) 32 tokens x H query heads
// (zero for heads whose KV head has no element in the lane). Every channel emits LPC lane
// slots per block (zeros for slots it does not own), so score_sum can add the 32
// streams in lockstep with one adder tree.
void score_mac(int c, int nb, hstream<word_t>& ks, hstream<acc_t>& qs, hstream<acc_t>& ps) {
    const int lf = lane_first(c), lc = lane_count(c);
    acc_t ql[D];
    acc_t part[VEC][H];
#pragma HLS array_partition variable = part dim = 2 complete
    for (int i = 0; i < D; ++i) ql[i] = qs.read();
    for (int b = 0; b < MAX_BLOCKS; ++b) {
        if (b >= nb) break;
        for (int i = 0; i < LPC; ++i) {
            for (int r = 0; r < VEC; ++r)
                for (int h = 0; h < H; ++h) part[r][h] = 0;
            for (int r = 0; r < VEC; ++r) {
                if (i >= lc) break;  // a lane slot this channel does not own: zeros
                for (int w = 0; w < ROW_WORDS; ++w) {
#pragma HLS pipeline II = 1
                    const word_t v = ks.read();
                    for (int j = 0; j < EPW; ++j) {
#pragma HLS unroll
                        const int e = (lf + i) * VEC + w * EPW + j;
                        if (e >= KVD) continue;  // pad lane element
                        const acc_t kv = word_elem(v, j);
                        for (int gq = 0; gq < GROUP; ++gq) {
                            const int hq = (e / HD) * GROUP + gq;
                            part[r][hq] += ql[hq * HD + e % HD] * kv;
                        }
                    }
                }
            }
            for (int r = 0; r < VEC; ++r)
                for (int h = 0; h < H; ++h) {
#pragma HLS pipeline II = 1
                    ps.write(part[r][h]);
                }
        }
    }
}

void score_sum(hstream<acc_t> ps[NCH], int nb, int p, acc_t scores[H][MAX_T]) {
    acc_t blk[VEC][H];
    const acc_t scale = 1.0f / k_sqrt((acc_t)HD);
    for (int b = 0; b < MAX_BLOCKS; ++b) {
        if (b >= nb) break;
        for (int r = 0; r < VEC; ++r)
            for (int h = 0; h < H; ++h) blk[r][h] = 0;
        for (int i = 0; i < LPC; ++i)
            for (int r = 0; r < VEC; ++r)
                for (int h = 0; h < H; ++h) {
#pragma HLS pipeline II = 1
                    acc_t s = 0;  // one value from each channel: a 32-input adder tree
                    for (int c = 0; c < NCH; ++c) {
#pragma HLS unroll
                        s += ps[c].read();
                    }
                    blk[r][h] += s;
                }
        for (int r = 0; r < VEC; ++r) {
            const int t = b * VEC + r;
            if (t > p) break;  // rows past the live tokens hold zeros or stale data
            for (int h = 0; h < H; ++h) scores[h][t] = blk[r][h] * scale;
        }
    }
}

void q_broadcast(const acc_t q[D], hstream<acc_t> qs[NCH]) {
    for (int i = 0; i < D; ++i) {
#pragma HLS pipeline II = 1
        for (int c = 0; c < NCH; ++c) {
#pragma HLS unroll
            qs[c].write(q[i]);
        }
    }
}

void att_scores(HBM_GMEM_PARAMS, const uint32_t kw[NCH], int nb, int p, const acc_t q[D],
                acc_t scores[H][MAX_T]) {
#pragma HLS dataflow
    hstream<word_t> ks[NCH];
    hstream<acc_t> qs[NCH];
    hstream<acc_t> ps[NCH];
#pragma HLS stream variable = ks depth = 64
    q_broadcast(q, qs);
#define HBM_K_READ(ch) tile_read(gmem##ch, ch, kw[ch], nb, ks[ch]);
    HBM_FOR_EACH_CHANNEL(HBM_K_READ)
#undef HBM_K_READ
#define HBM_SCORE(ch) score_mac(ch, nb, ks[ch], qs[ch], ps[ch]);
    HBM_FOR_EACH_CHANNEL(HBM_SCORE)
#undef HBM_SCORE
    score_sum(ps, nb, p, scores);
}

// Softmax over tokens 0..p of every query head (serial: max, exp and sum, scale).
void softmax(acc_t scores[H][MAX_T], int p) {
    for (int h = 0; h < H; ++h) {
        acc_t m = scores[h][0];
        for (int t = 1; t < MAX_T; ++t) {
            if (t > p) break;
            m = scores[h][t] > m ? scores[h][t] : m;
        }
        acc_t s = 0;
        for (int t = 0; t < MAX_T; ++t) {
#pragma HLS pipeline II = 1
            if (t > p) break;
            scores[h][t] = k_exp(scores[h][t] - m);
            s += scores[h][t];
        }
        for (int t = 0; t < MAX_T; ++t) {
#pragma HLS pipeline II = 1
            if (t > p) break;
            scores[h][t] /= s;
        }
    }
}

// Probabilities of one block at a time, H x 32, to every channel (zeros past p).
void prob_broadcast(const acc_t probs[H][MAX_T], int nb, int p, hstream<acc_t> prs[NCH]) {
    for (int b = 0; b < MAX_BLOCKS; ++b) {
        if (b >= nb) break;
        for (int h = 0; h < H; ++h) {
            for (int r = 0; r < VEC; ++r) {
#pragma HLS pipeline II = 1
                const int t = b * VEC + r;
                const acc_t v = t <= p ? probs[h][t] : (acc_t)0;
                for (int c = 0; c < NCH; ++c) {
#pragma HLS unroll
                    prs[c].write(v);
                }
            }
        }
    }
}

// Channel c's p.V: each V tile row is one output dim over 32 tokens.
void value_mac(int c, int nb, int p, hstream<word_t>& vs, hstream<acc_t>& prs,
               hstream<acc_t>& os) {
    constexpr int LMAX = LPC > 0 ? LPC : 1;
    const int lf = lane_first(c), lc = lane_count(c);
    acc_t pb[H][VEC];
#pragma HLS array_partition variable = pb dim = 2 cyclic factor = EPW
    acc_t o[LMAX * VEC][GROUP];
    for (int i = 0; i < LMAX * VEC; ++i)
        for (int g = 0; g < GROUP; ++g) o[i][g] = 0;
    for (int b = 0; b < MAX_BLOCKS; ++b) {
        if (b >= nb) break;
        for (int h = 0; h < H; ++h)
            for (int r = 0; r < VEC; ++r) pb[h][r] = prs.read();
        for (int i = 0; i < LPC; ++i) {
            if (i >= lc) break;
            for (int d = 0; d < VEC; ++d) {
                const int e = (lf + i) * VEC + d;
                for (int w = 0; w < ROW_WORDS; ++w) {
#pragma HLS pipeline II = 1
                    const word_t v = vs.read();
                    if (e >= KVD) continue;  // pad lane element
                    for (int j = 0; j < EPW; ++j) {
#pragma HLS unroll
                        const int r = w * EPW + j;
                        if (b * VEC + r > p) continue;  // stale rows never reach the sum
                        const acc_t x = word_elem(v, j);
                        for (int gq = 0; gq < GROUP; ++gq)
                            o[i * VEC + d][gq] += pb[(e / HD) * GROUP + gq][r] * x;
                    }
                }
            }
        }
    }
    for (int i = 0; i < lc * VEC; ++i)
        for (int g = 0; g < GROUP; ++g) os.write(o[i][g]);
}

void att_gather(hstream<acc_t> os[NCH], acc_t att[D]) {
    for (int c = 0; c < NCH; ++c) {
        for (int i = 0; i < lane_count(c) * VEC; ++i) {
            const int e = lane_first(c) * VEC + i;
            for (int g = 0; g < GROUP; ++g) {
                const acc_t v = os[c].read();
                if (e < KVD) att[((e / HD) * GROUP + g) * HD + e % HD] = v;
            }
        }
    }
}

void att_values(HBM_GMEM_PARAMS, const uint32_t vw[NCH], int nb, int p,
                const acc_t probs[H][MAX_T], acc_t att[D]) {
#pragma HLS dataflow
    hstream<word_t> vs[NCH];
    hstream<acc_t> prs[NCH];
    hstream<acc_t> os[NCH];
#pragma HLS stream variable = vs depth = 64
    prob_broadcast(probs, nb, p, prs);
#define HBM_V_READ(ch) tile_read(gmem##ch, ch, vw[ch], nb, vs[ch]);
    HBM_FOR_EACH_CHANNEL(HBM_V_READ)
#undef HBM_V_READ
#define HBM_VALUE(ch) value_mac(ch, nb, p, vs[ch], prs[ch], os[ch]);
    HBM_FOR_EACH_CHANNEL(HBM_VALUE)
#undef HBM_VALUE
    att_gather(os, att);
}

void attention(HBM_GMEM_PARAMS, const uint32_t kw[NCH], const uint32_t vw[NCH], int p,
               const acc_t q[D], acc_t att[D]) {
    static acc_t scores[H][MAX_T];  // one layer's scores, then probabilities
    const int nb = p / VEC + 1;
    att_scores(HBM_GMEM_ARGS, kw, nb, p, q, scores);
    softmax(scores, p);
    att_values(HBM_GMEM_ARGS, vw, nb, p, scores, att);
}

// ------------------------------------------------------------------ step ------------
// HF rotate-half RoPE of n heads, in place.
void rope(acc_t* x, int n, const acc_t cs[HD], const acc_t sn[HD]) {
    for (int h = 0; h < H; ++h) {
        if (h >= n) break;
        acc_t tmp[HD];
        for (int d = 0; d < HD; ++d) tmp[d] = x[h * HD + d];
        for (int d = 0; d < HD; ++d) {
#pragma HLS pipeline II = 1
            const acc_t rot = d < HD / 2 ? -tmp[d + HD / 2] : tmp[d - HD / 2];
            x[h * HD + d] = tmp[d] * cs[d] + rot * sn[d];
        }
    }
}

acc_t gelu_tanh(acc_t x) {
    const acc_t k_beta = 0.7978845608028654f;  // sqrt(2 / pi)
    const acc_t inner = k_beta * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + k_tanh(inner));
}

void decode_step(HBM_GMEM_PARAMS, const uint32_t kvw[NCH], uint32_t half_words, int token,
                 int pos, acc_t logits[VOCAB]) {
    static acc_t x[D], h[D], q[D], att[D], tmp[D];
    static acc_t k[KVD], v[KVD];
    static acc_t up[F], gate[F];
    acc_t cs[HD], sn[HD];
    read_row<VOCAB, D>(HBM_GMEM_ARGS, cfg::TOK_EMB, token, x);
    if (GPT2) {
        read_row<MAX_T, D>(HBM_GMEM_ARGS, cfg::POS_EMB, pos, tmp);
        for (int i = 0; i < D; ++i) x[i] += tmp[i];
    }
    for (int d = 0; d < HD; ++d) {  // Llama RoPE tables (HF: inv_freq = 1 / theta^(2i/HD))
        const acc_t e = (acc_t)(2 * (d % (HD / 2))) / (acc_t)HD;
        const acc_t f = (acc_t)pos * (1.0f / k_pow((acc_t)cfg::ROPE_THETA, e));
        cs[d] = k_cos(f);
        sn[d] = k_sin(f);
    }
    for (int l = 0; l < cfg::LAYERS; ++l) {
        const uint32_t lo = (uint32_t)l * cfg::LAYER_STRIDE;
        norm(gmem0, cfg::NORM1_W + lo, cfg::NORM1_B + lo, x, h);
        matvec<D, D>(HBM_GMEM_ARGS, cfg::Q_W + lo, cfg::Q_B + lo, GPT2, h, q);
        matvec<KVD, D>(HBM_GMEM_ARGS, cfg::K_W + lo, cfg::K_B + lo, GPT2, h, k);
        matvec<KVD, D>(HBM_GMEM_ARGS, cfg::V_W + lo, cfg::V_B + lo, GPT2, h, v);
        if (!GPT2) {
            rope(q, H, cs, sn);
            rope(k, HKV, cs, sn);
        }
        uint32_t kw[NCH], vw[NCH];
#pragma HLS array_partition variable = kw complete
#pragma HLS array_partition variable = vw complete
        for (int c = 0; c < NCH; ++c) {
#pragma HLS unroll
            kw[c] = kvw[c] + (uint32_t)l * 2 * half_words;
            vw[c] = kw[c] + half_words;
        }
        kv_append(HBM_GMEM_ARGS, kw, vw, pos, k, v);
        attention(HBM_GMEM_ARGS, kw, vw, pos, q, att);
        matvec<D, D>(HBM_GMEM_ARGS, cfg::O_W + lo, cfg::O_B + lo, GPT2, att, tmp);
        for (int i = 0; i < D; ++i) x[i] += tmp[i];
        norm(gmem0, cfg::NORM2_W + lo, cfg::NORM2_B + lo, x, h);
        if (GPT2) {
            matvec<F, D>(HBM_GMEM_ARGS, cfg::UP_W + lo, cfg::UP_B + lo, true, h, up);
            for (int i = 0; i < F; ++i) up[i] = gelu_tanh(up[i]);
        } else {
            matvec<F, D>(HBM_GMEM_ARGS, cfg::GATE_W + lo, 0, false, h, gate);
            matvec<F, D>(HBM_GMEM_ARGS, cfg::UP_W + lo, 0, false, h, up);
            for (int i = 0; i < F; ++i) up[i] = gate[i] / (1.0f + k_exp(-gate[i])) * up[i];
        }
        matvec<D, F>(HBM_GMEM_ARGS, cfg::DOWN_W + lo, cfg::DOWN_B + lo, GPT2, up, tmp);
        for (int i = 0; i < D; ++i) x[i] += tmp[i];
    }
    norm(gmem0, cfg::FNORM_W, cfg::FNORM_B, x, h);
    matvec<VOCAB, D>(HBM_GMEM_ARGS, cfg::LM_HEAD, 0, false, h, logits);
}

// ------------------------------------------------------------------ io / meta -------
void io_put_u64(word_t* io, int byte, uint64_t v) {
    word_t w = io[byte / 64];
    word_set_u64(w, byte % 64, v);
    io[byte / 64] = w;
}

void io_result(word_t* io, int64_t status, int64_t done) {
    word_t w = io[abi::OFF_STATUS / 64];
    word_set_u64(w, abi::OFF_STATUS % 64, (uint64_t)status);
    word_set_u64(w, abi::OFF_STEPS_DONE % 64, (uint64_t)done);
    io[abi::OFF_STATUS / 64] = w;
}

// The logits of the last step, packed 16 to a word (the first word is shared with the
// end of tokens[], so it is read first).
void io_logits(word_t* io, const acc_t logits[VOCAB]) {
    int wi = abi::OFF_LOGITS / 64;
    word_t w = io[wi];
    for (int i = 0; i < VOCAB; ++i) {
#pragma HLS pipeline II = 1
        const int byte = abi::OFF_LOGITS + 4 * i;
        if (byte / 64 != wi) {
            io[wi] = w;
            wi = byte / 64;
            w = word_zero();
        }
        word_set_u32(w, byte % 64, f32_bits(logits[i]));
    }
    io[wi] = w;
}

// The meta buffer must hold exactly the spec this bitstream was built for (FNV-1a 64).
bool meta_matches(const word_t* meta) {
    constexpr int NB = 8 + cfg::META_LEN;
    if (word_u64(meta[0], 0) != (uint64_t)cfg::META_LEN) return false;
    uint64_t hsh = 0xcbf29ce484222325ull;  // FNV-1a 64 offset basis
    for (int w = 0; w < (NB + 63) / 64; ++w) {
        const word_t v = meta[w];
        for (int b = 0; b < 64; ++b) {
            if (w * 64 + b >= NB) break;
            hsh ^= word_u8(v, b);
            hsh *= 1099511628211ull;
        }
    }
    return hsh == cfg::META_FNV;
}

int argmax(const acc_t logits[VOCAB]) {  // first maximal index
    int best = 0;
    for (int i = 1; i < VOCAB; ++i)
        if (logits[i] > logits[best]) best = i;
    return best;
}

}  // namespace

extern "C" void hbm_decode(HBM_GMEM_PARAMS, word_t* io, const word_t* meta, int n_steps,
                           int position, int token, int kv_capacity) {
#pragma HLS INTERFACE m_axi port = gmem0 offset = slave bundle = gmem0 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem1 offset = slave bundle = gmem1 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem2 offset = slave bundle = gmem2 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem3 offset = slave bundle = gmem3 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem4 offset = slave bundle = gmem4 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem5 offset = slave bundle = gmem5 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem6 offset = slave bundle = gmem6 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem7 offset = slave bundle = gmem7 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem8 offset = slave bundle = gmem8 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem9 offset = slave bundle = gmem9 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem10 offset = slave bundle = gmem10 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem11 offset = slave bundle = gmem11 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem12 offset = slave bundle = gmem12 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem13 offset = slave bundle = gmem13 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem14 offset = slave bundle = gmem14 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem15 offset = slave bundle = gmem15 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem16 offset = slave bundle = gmem16 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem17 offset = slave bundle = gmem17 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem18 offset = slave bundle = gmem18 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem19 offset = slave bundle = gmem19 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem20 offset = slave bundle = gmem20 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem21 offset = slave bundle = gmem21 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem22 offset = slave bundle = gmem22 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem23 offset = slave bundle = gmem23 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem24 offset = slave bundle = gmem24 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem25 offset = slave bundle = gmem25 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem26 offset = slave bundle = gmem26 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem27 offset = slave bundle = gmem27 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem28 offset = slave bundle = gmem28 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem29 offset = slave bundle = gmem29 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem30 offset = slave bundle = gmem30 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = gmem31 offset = slave bundle = gmem31 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = io offset = slave bundle = gmem_io
#pragma HLS INTERFACE m_axi port = meta offset = slave bundle = gmem_meta
#pragma HLS INTERFACE s_axilite port = n_steps bundle = control
#pragma HLS INTERFACE s_axilite port = position bundle = control
#pragma HLS INTERFACE s_axilite port = token bundle = control
#pragma HLS INTERFACE s_axilite port = kv_capacity bundle = control
#pragma HLS INTERFACE s_axilite port = return bundle = control

    // io header: magic, kv_base[32] (bytes 0..263, words 0..4)
    word_t hdr[5];
#pragma HLS array_partition variable = hdr complete
    for (int w = 0; w < 5; ++w) hdr[w] = io[w];
    const uint64_t magic = word_u64(hdr[0], 0);
    uint32_t kvw[NCH];
#pragma HLS array_partition variable = kvw complete
    bool aligned = true;
    for (int c = 0; c < NCH; ++c) {
#pragma HLS unroll
        const int byte = abi::OFF_KV_BASE + 8 * c;
        const int64_t b = (int64_t)word_u64(hdr[byte / 64], byte % 64);
        aligned = aligned && b >= 0 && b % 64 == 0 && b / 64 < 0xffffffffll;
        kvw[c] = (uint32_t)(b / 64);
    }
    const bool ok = magic == abi::IO_MAGIC && n_steps >= 1 && n_steps <= abi::MAX_STEPS &&
                    token >= 0 && token < VOCAB && position >= 0 && kv_capacity >= 0 &&
                    kv_capacity % VEC == 0 && aligned && meta_matches(meta);
    if (!ok) {
        io_result(io, abi::STATUS_BAD_ARGS, 0);
        return;
    }
    if ((long)position + n_steps > cmin(kv_capacity, MAX_T)) {
        io_result(io, abi::STATUS_KV_FULL, 0);
        return;
    }
    // one layer's K half (= V half) in every channel, sized for the fullest channel
    const uint32_t half_words = (uint32_t)(kv_capacity / VEC) * LPC * TILE_WORDS;
    static acc_t logits[VOCAB];
    int tok = token;
    for (int i = 0; i < abi::MAX_STEPS; ++i) {
        if (i >= n_steps) break;
        decode_step(HBM_GMEM_ARGS, kvw, half_words, tok, position + i, logits);
        tok = argmax(logits);
        io_put_u64(io, abi::OFF_TOKENS + 8 * i, (uint64_t)tok);
    }
    io_logits(io, logits);
    io_result(io, abi::STATUS_OK, n_steps);
}
