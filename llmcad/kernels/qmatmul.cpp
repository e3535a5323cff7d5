// y = x W^T for W in GGUF's quantized formats (Q4_K, Q6_K, Q8_0, Q5_0, Q4_0), on the CPU.
//
// Layout. A matrix is repacked once, when a model is converted or loaded (llmcad_pack), from
// GGUF's blocks (one column's 32 or 256 weights) into tiles: a tile holds one block of each of
// 16 consecutive columns, field by field, so that one 64-byte register holds 4 consecutive
// codes of each of the 16 columns. One dot-product instruction (vpdpbusd: four unsigned x
// signed byte products summed into each int32 lane) multiplies them with 4 activations
// broadcast to every lane; the 16 lanes are the 16 columns' sums, so no horizontal sums are
// needed, and a sub-block's scale costs one integer multiply per 32 weights (16 for Q6_K) and
// column. AVX2 holds 8 columns a register and computes a tile in two halves, one block after
// the other; without VNNI it sums maddubs's int16 pairs over a whole sub-block before one
// madd, which applies the sub-block's scale. A decoded register serves up to 8 activation
// rows (4 on AVX2) before the next is decoded. Codes are
// unsigned (Q8_0 stores q + 128); the offsets (Q4_K's mins, Q6_K's -32, Q8_0's -128, Q5_0's
// -16, Q4_0's -8) apply through sums of the activations. Bytes per weight are GGUF's, except Q4_K: 148
// bytes per 256 weights instead of 144 (its 6-bit scales and mins unpacked to bytes).
//
// Activations: each row is quantized on its own to int8 with one float scale per 256 values
// (the last group may be shorter), as llama.cpp's Q8_K, plus int16 sums of every 16 and
// every 32 quantized values. The rows a decoded register serves have their codes interleaved
// 4 at a time, so the kernels address them all from one pointer.
//
// Arithmetic: every sum of integer products is exact, in int32; per block (K-quants) or per
// 256 values (32-blocks) the result meets the float scales in a fixed sequence of float
// multiplies and fused multiply-adds. Each output (row, column) therefore gets the same bits
// whatever the rows beside it in the call, the thread computing it and the dispatch path:
// verifying a token tree reproduces one-token decoding exactly, and an AVX2 machine computes
// what an AVX-512 one does.
//
// Paths: portable C++ (16 lanes as arrays: the reference, any CPU), AVX2 (+FMA, F16C), AVX2
// with AVX-VNNI, and AVX-512 (F, BW, VL, VNNI). The SIMD paths are compiled with function
// target attributes and chosen at run time from cpuid, so one build runs everywhere. All
// paths run the same kernel templates over a small set of lane operations (the `Lanes`
// structs). Threads split the column tiles: PyTorch's OpenMP runtime when the caller hands
// over its entry points (llmcad_use_openmp), else a pool of our own. Interface: the
// extern "C" functions at the end.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

// The kernels' building blocks (tiles.h) must inline into one loop body: called, they would
// pass their register arrays through memory.
#define ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMCAD_X86 1
#endif

namespace {

enum QType { Q4_K = 0, Q6_K = 1, Q8_0 = 2, Q5_0 = 3, Q4_0 = 4 };
enum Path { PORTABLE = 0, AVX2 = 1, AVXVNNI = 2, AVX512 = 3 };

constexpr int TILE = 16;        // columns interleaved in a tile
constexpr int SUPER = 256;      // activation scale group
constexpr int PREFETCH = 4096;  // bytes of weights requested ahead of the tile being decoded

// A tile's fields, in order; each is `count` elements of `size` bytes per column, stored
// element-major: element i of column c of a tile `width` columns wide is at
// offset(field) * width + (i * width + c) * size.
struct Field { int count, size; };
struct Format {
  int block;        // weights per block
  int gguf_bytes;   // bytes of one GGUF block
  int fields;
  Field field[5];
};
// Q4_K: d, dmin (fp16), 8 scales, 4 pairs of mins, 32 x 4 bytes of codes: byte b of element i
//       holds code 8i+b (low nibble) and 8i+4+b (high nibble).
// Q6_K: d, 8 pairs of int8 scales (one per 16 weights), 32 x 4 bytes of low nibbles as Q4_K's,
//       16 x 4 bytes of high bits: bits 2t, 2t+1 of byte b of element i are those of code 16i+4t+b.
// Q8_0: d, 8 x 4 bytes of codes q + 128 (code 4i+b in byte b of element i).
// Q5_0: d, 4 bytes of fifth bits (bit 2i+h of byte b: code 8i+4h+b), 4 x 4 bytes of nibbles as Q4_K's.
// Q4_0: d, 4 x 4 bytes of nibbles as Q4_K's.
enum { D = 0, DMIN = 1, SC = 2, MN = 3, Q4_QS = 4 };  // Q4_K fields
enum { Q6_SC = 1, Q6_QS = 2, Q6_QH = 3 };             // Q6_K fields
enum { Q8_QS = 1 };                                   // Q8_0 fields
enum { Q5_QH = 1, Q5_QS = 2 };                        // Q5_0 fields
enum { Q40_QS = 1 };                                  // Q4_0 fields
constexpr Format FORMATS[] = {
    {256, 144, 5, {{1, 2}, {1, 2}, {8, 1}, {4, 2}, {32, 4}}},
    {256, 210, 4, {{1, 2}, {8, 2}, {32, 4}, {16, 4}}},
    {32, 34, 2, {{1, 2}, {8, 4}}},
    {32, 22, 3, {{1, 2}, {1, 4}, {4, 4}}},
    {32, 18, 2, {{1, 2}, {4, 4}}},
};

constexpr int field_offset(int qtype, int field) {  // bytes per column before `field`
  int at = 0;
  for (int f = 0; f < field; ++f) at += FORMATS[qtype].field[f].count * FORMATS[qtype].field[f].size;
  return at;
}

constexpr int packed_bytes(int qtype) { return field_offset(qtype, FORMATS[qtype].fields); }  // per column and block

ALWAYS_INLINE uint8_t* element(uint8_t* tile, int qtype, int field, int i, int width, int c) {
  return tile + field_offset(qtype, field) * width + (i * width + c) * FORMATS[qtype].field[field].size;
}

float fp16(uint16_t h) {  // IEEE half -> float, exact
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man) {  // subnormal: renormalize
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  } else {
    bits = sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t to_fp16(float f) {  // float -> IEEE half, rounded to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;  // nan
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // inf, or rounds past the largest half
  auto rounded = [](uint32_t man, int drop) {  // man >> drop, to nearest even
    const uint32_t q = man >> drop, rest = man & ((1u << drop) - 1), half = 1u << (drop - 1);
    return q + (rest > half || (rest == half && (q & 1)));
  };
  if (ax < 0x38800000u)  // a subnormal half (a carry gives the smallest normal one), or zero
    return ax < 0x33000000u ? sign : sign | rounded((ax & 0x7fffffu) | 0x800000u, 126 - (int)(ax >> 23));
  return sign | rounded(ax - 0x38000000u, 13);  // exponent rebiased from 127 to 15
}

// One Q4_0 block (18 bytes) of 32 values, as ggml's reference quantizer makes it: d = the
// value of largest magnitude / -8, codes min(15, trunc(x / d + 8.5)).
void quantize_q4_0(const float* v, uint8_t* out) {
  float amax = 0.f, max = 0.f;
  for (int i = 0; i < 32; ++i)
    if (amax < std::fabs(v[i])) amax = std::fabs(v[i]), max = v[i];
  const float d = max / -8.f, id = d != 0.f ? 1.f / d : 0.f;
  const uint16_t h = to_fp16(d);
  std::memcpy(out, &h, 2);
  for (int i = 0; i < 16; ++i) {
    const int lo = std::min(15, (int)(v[i] * id + 8.5f)), hi = std::min(15, (int)(v[16 + i] * id + 8.5f));
    out[2 + i] = (uint8_t)(lo | hi << 4);
  }
}

// ---- one column's block, unpacked --------------------------------------------------------

struct Block {
  uint16_t d = 0, dmin = 0;  // fp16 bits
  uint8_t sc[16] = {};       // Q4_K: 8 scales; Q6_K: 16 int8 scales (their bytes)
  uint8_t mn[8] = {};        // Q4_K: 8 mins
  uint8_t u[256] = {};       // unsigned codes: Q4_K 0..15, Q6_K 0..63, Q8_0 q + 128, Q5_0 0..31, Q4_0 0..15
};

// Q4_K's eight 6-bit scales and mins (12 bytes) -> sc[8], mn[8], four at a time in 32-bit words.
void q4k_scales(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  uint32_t a[3], out[4];
  std::memcpy(a, s, 12);
  out[0] = a[0] & 0x3f3f3f3fu;                                          // scales 0..3
  out[1] = (a[2] & 0x0f0f0f0fu) | ((a[0] >> 6) & 0x03030303u) << 4;     // scales 4..7
  out[2] = a[1] & 0x3f3f3f3fu;                                          // mins 0..3
  out[3] = ((a[2] >> 4) & 0x0f0f0f0fu) | ((a[1] >> 6) & 0x03030303u) << 4;  // mins 4..7
  std::memcpy(sc, out, 8);
  std::memcpy(mn, out + 2, 8);
}

void read_gguf(int qtype, const uint8_t* b, Block& o) {
  std::memcpy(&o.d, b, 2);
  if (qtype == Q4_K) {
    std::memcpy(&o.dmin, b + 2, 2);
    q4k_scales(b + 4, o.sc, o.mn);
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) {
        o.u[64 * c + l] = b[16 + 32 * c + l] & 0xf;
        o.u[64 * c + 32 + l] = b[16 + 32 * c + l] >> 4;
      }
  } else if (qtype == Q6_K) {
    std::memcpy(&o.d, b + 208, 2);
    std::memcpy(o.sc, b + 192, 16);
    const uint8_t *ql = b, *qh = b + 128;
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {
        uint8_t* u = o.u + 128 * h;
        const uint8_t *L = ql + 64 * h, *H = qh + 32 * h;
        u[l] = (L[l] & 0xf) | ((H[l] & 3) << 4);
        u[l + 32] = (L[l + 32] & 0xf) | (((H[l] >> 2) & 3) << 4);
        u[l + 64] = (L[l] >> 4) | (((H[l] >> 4) & 3) << 4);
        u[l + 96] = (L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4);
      }
  } else if (qtype == Q8_0) {
    for (int l = 0; l < 32; ++l) o.u[l] = b[2 + l] ^ 0x80;  // int8 q -> q + 128
  } else if (qtype == Q4_0) {
    for (int l = 0; l < 16; ++l) {
      o.u[l] = b[2 + l] & 0xf;
      o.u[l + 16] = b[2 + l] >> 4;
    }
  } else {
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    for (int l = 0; l < 16; ++l) {
      o.u[l] = (b[6 + l] & 0xf) | ((qh >> l) & 1) << 4;
      o.u[l + 16] = (b[6 + l] >> 4) | ((qh >> (l + 16)) & 1) << 4;
    }
  }
}

// Column c of a tile `width` columns wide <-> its block. The codes' bit layout is the one the
// kernels decode (see FORMATS).
void write_tile(int qtype, const Block& o, uint8_t* t, int width, int c) {
  auto at = [&](int field, int i) { return element(t, qtype, field, i, width, c); };
  std::memcpy(at(D, 0), &o.d, 2);
  if (qtype == Q4_K || qtype == Q6_K) {
    const int qs = qtype == Q4_K ? (int)Q4_QS : (int)Q6_QS;
    for (int i = 0; i < 32; ++i)
      for (int b = 0; b < 4; ++b) at(qs, i)[b] = (o.u[8 * i + b] & 0xf) | (o.u[8 * i + 4 + b] & 0xf) << 4;
  }
  if (qtype == Q4_K) {
    std::memcpy(at(DMIN, 0), &o.dmin, 2);
    for (int s = 0; s < 8; ++s) *at(SC, s) = o.sc[s];
    for (int j = 0; j < 4; ++j) std::memcpy(at(MN, j), o.mn + 2 * j, 2);
  } else if (qtype == Q6_K) {
    for (int j = 0; j < 8; ++j) std::memcpy(at(Q6_SC, j), o.sc + 2 * j, 2);
    for (int i = 0; i < 16; ++i)
      for (int b = 0; b < 4; ++b) {
        uint8_t bits = 0;
        for (int s = 0; s < 4; ++s) bits |= (o.u[16 * i + 4 * s + b] >> 4) << (2 * s);
        at(Q6_QH, i)[b] = bits;
      }
  } else if (qtype == Q8_0) {
    for (int i = 0; i < 8; ++i) std::memcpy(at(Q8_QS, i), o.u + 4 * i, 4);
  } else if (qtype == Q4_0) {
    for (int i = 0; i < 4; ++i)
      for (int b = 0; b < 4; ++b) at(Q40_QS, i)[b] = o.u[8 * i + b] | o.u[8 * i + 4 + b] << 4;
  } else {
    for (int b = 0; b < 4; ++b) {
      uint8_t bits = 0;
      for (int i = 0; i < 4; ++i) {
        at(Q5_QS, i)[b] = (o.u[8 * i + b] & 0xf) | (o.u[8 * i + 4 + b] & 0xf) << 4;
        for (int h = 0; h < 2; ++h) bits |= (o.u[8 * i + 4 * h + b] >> 4) << (2 * i + h);
      }
      at(Q5_QH, 0)[b] = bits;
    }
  }
}

void read_tile(int qtype, const uint8_t* tile, int width, int c, Block& o) {
  uint8_t* t = const_cast<uint8_t*>(tile);  // only read
  auto at = [&](int field, int i) { return (const uint8_t*)element(t, qtype, field, i, width, c); };
  std::memcpy(&o.d, at(D, 0), 2);
  if (qtype == Q4_K || qtype == Q6_K) {
    const int qs = qtype == Q4_K ? (int)Q4_QS : (int)Q6_QS;
    for (int i = 0; i < 32; ++i)
      for (int b = 0; b < 4; ++b) {
        o.u[8 * i + b] = at(qs, i)[b] & 0xf;
        o.u[8 * i + 4 + b] = at(qs, i)[b] >> 4;
      }
  }
  if (qtype == Q4_K) {
    std::memcpy(&o.dmin, at(DMIN, 0), 2);
    for (int s = 0; s < 8; ++s) o.sc[s] = *at(SC, s);
    for (int j = 0; j < 4; ++j) std::memcpy(o.mn + 2 * j, at(MN, j), 2);
  } else if (qtype == Q6_K) {
    for (int j = 0; j < 8; ++j) std::memcpy(o.sc + 2 * j, at(Q6_SC, j), 2);
    for (int i = 0; i < 16; ++i)
      for (int b = 0; b < 4; ++b)
        for (int s = 0; s < 4; ++s) o.u[16 * i + 4 * s + b] |= ((at(Q6_QH, i)[b] >> (2 * s)) & 3) << 4;
  } else if (qtype == Q8_0) {
    for (int i = 0; i < 8; ++i) std::memcpy(o.u + 4 * i, at(Q8_QS, i), 4);
  } else if (qtype == Q4_0) {
    for (int i = 0; i < 4; ++i)
      for (int b = 0; b < 4; ++b) {
        o.u[8 * i + b] = at(Q40_QS, i)[b] & 0xf;
        o.u[8 * i + 4 + b] = at(Q40_QS, i)[b] >> 4;
      }
  } else {
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h)
        for (int b = 0; b < 4; ++b)
          o.u[8 * i + 4 * h + b] = (at(Q5_QS, i)[b] >> (4 * h) & 0xf) | ((at(Q5_QH, 0)[b] >> (2 * i + h)) & 1) << 4;
  }
}

// The block's weights as float, with the arithmetic of ggml's reference dequantizers.
void dequantize_block(int qtype, const Block& o, float* out) {
  const float d = fp16(o.d);
  if (qtype == Q4_K) {
    const float dmin = fp16(o.dmin);
    for (int i = 0; i < 256; ++i) out[i] = d * o.sc[i / 32] * o.u[i] - dmin * o.mn[i / 32];
  } else if (qtype == Q6_K) {
    for (int i = 0; i < 256; ++i) {
      const int sc = (int8_t)o.sc[i / 16];
      out[i] = d * sc * o.u[i] - d * (32 * sc);
    }
  } else {
    const int offset = qtype == Q8_0 ? 128 : qtype == Q5_0 ? 16 : 8;
    for (int i = 0; i < 32; ++i) out[i] = d * (o.u[i] - offset);
  }
}

// Bytes of one packed matrix row group: the tiles of `width` columns over k weights.
int64_t tile_bytes(int qtype, int width) { return (int64_t)packed_bytes(qtype) * width; }

// The tile of block `blk` in column group `g` of a packed [n, k] matrix, and its width.
const uint8_t* tile_at(int qtype, const uint8_t* w, int64_t n, int64_t k, int64_t g, int64_t blk, int& width) {
  width = (int)std::min<int64_t>(TILE, n - g * TILE);
  const int64_t blocks = k / FORMATS[qtype].block;
  return w + g * TILE * blocks * packed_bytes(qtype) + blk * tile_bytes(qtype, width);
}

// ---- activations ----------------------------------------------------------------------

struct Activations {
  int64_t m, k, kpad, groups;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> s16, s32;  // sums of every 16 and 32 quantized values
  std::vector<int8_t> row;         // one row's codes before they are interleaved (kept: no allocation per call)
  const float* drow(int64_t r) const { return d.data() + r * groups; }
  const int16_t* s16row(int64_t r) const { return s16.data() + r * (kpad / 16); }
  const int16_t* s32row(int64_t r) const { return s32.data() + r * (kpad / 32); }
};

// Work for one thread: column groups [g0, g1) of all rows.
struct Job {
  int qtype;
  const uint8_t* w;  // packed [n, k]
  int64_t n;
  const Activations* a;
  float* y;  // [m, n], rows `ldy` floats apart
  int64_t ldy;
};

// One pass's attention (attention.h): q [rows, heads, dim]; a cache layer's keys, transposed,
// k [kv_heads, dim, capacity] and values v [kv_heads, capacity, dim], of which the first
// `slots` are attended to; mask [rows, slots] (nonzero: may attend) or null.
struct AttentionJob {
  const float *q, *k, *v;
  const uint8_t* mask;
  int64_t rows, heads, kv_heads, dim, slots, capacity;
  float scale, softcap;  // softcap 0: none
  float* out;            // [rows, heads, dim]
};

// ---- portable lanes: 16 lanes as arrays (the reference; any CPU) ---------------------------

struct PortableLanes {
  static constexpr int LANES = TILE, ROWS = 8;
  using Bytes = std::array<uint8_t, 64>;
  using Ints = std::array<int32_t, TILE>;
  using Floats = std::array<float, TILE>;
  using Part = Ints;  // exact int32 sums: a run is the whole sum
  template <class F>
  static Ints each(F f) { Ints o; for (int l = 0; l < TILE; ++l) o[l] = f(l); return o; }
  template <class F>
  static Floats feach(F f) { Floats o; for (int l = 0; l < TILE; ++l) o[l] = f(l); return o; }
  template <class F>
  static Bytes beach(F f) { Bytes o; for (int i = 0; i < 64; ++i) o[i] = f(i); return o; }

  static Bytes load(const uint8_t* p) { Bytes o; std::memcpy(o.data(), p, 64); return o; }
  static Bytes shr_and(const Bytes& v, int s, uint8_t m) { return beach([&](int i) { return (uint8_t)((v[i] >> s) & m); }); }
  static Bytes shl_and(const Bytes& v, int s, uint8_t m) { return beach([&](int i) { return (uint8_t)((v[i] << s) & m); }); }
  static Bytes or_(const Bytes& a, const Bytes& b) { return beach([&](int i) { return (uint8_t)(a[i] | b[i]); }); }
  static Ints dot(const Ints& acc, const Bytes& w, const int8_t* x) {
    return each([&](int l) { int32_t s = acc[l]; for (int b = 0; b < 4; ++b) s += w[4 * l + b] * x[b]; return s; });
  }
  static Ints wide_dot(const Ints& acc, const Bytes& w, const int8_t* x) { return dot(acc, w, x); }
  static constexpr int run(int) { return 64; }
  static Part begin(const Ints& acc) { return acc; }
  static Ints end(const Ints&, const Part& part) { return part; }
  using Scale = Ints;
  static Scale scale_u8(const uint8_t* p) { return u8(p); }
  static Scale scale_half(const Ints& v, int h) { return h ? high16(v) : low16(v); }
  static Ints end_scaled(const Ints& acc, const Part& part, const Scale& s) { return add(acc, mul(part, s)); }
  static Ints pair_dot(const Ints& acc, const Ints& v, const int16_t* p) {
    return each([&](int l) { return acc[l] + (int16_t)(v[l] & 0xffff) * p[0] + (v[l] >> 16) * p[1]; });
  }
  static Ints u8(const uint8_t* p) { return each([&](int l) { return (int32_t)p[l]; }); }
  static Ints u8_pairs(const uint8_t* p) { return each([&](int l) { return (int32_t)(p[2 * l] | p[2 * l + 1] << 16); }); }
  static Ints i8_pairs(const uint8_t* p) {
    return each([&](int l) { return (int32_t)(((uint32_t)(uint16_t)(int8_t)p[2 * l]) | ((uint32_t)(int8_t)p[2 * l + 1] << 16)); });
  }
  static Ints low16(const Ints& v) { return each([&](int l) { return (int32_t)(int16_t)(v[l] & 0xffff); }); }
  static Ints high16(const Ints& v) { return each([&](int l) { return v[l] >> 16; }); }
  static Ints add(const Ints& a, const Ints& b) { return each([&](int l) { return a[l] + b[l]; }); }
  static Ints sub(const Ints& a, const Ints& b) { return each([&](int l) { return a[l] - b[l]; }); }
  static Ints mul(const Ints& a, const Ints& b) { return each([&](int l) { return a[l] * b[l]; }); }
  static Ints shl(const Ints& v, int s) { return each([&](int l) { return (int32_t)((uint32_t)v[l] << s); }); }
  static Ints set(int32_t v) { return each([&](int) { return v; }); }
  static Floats halves(const uint8_t* p) {
    return feach([&](int l) { uint16_t h; std::memcpy(&h, p + 2 * l, 2); return fp16(h); });
  }
  static Floats cvt(const Ints& v) { return feach([&](int l) { return (float)v[l]; }); }
  static Floats fmul(const Floats& a, const Floats& b) { return feach([&](int l) { return a[l] * b[l]; }); }
  static Floats fmadd(const Floats& a, const Floats& b, const Floats& c) { return feach([&](int l) { return std::fma(a[l], b[l], c[l]); }); }
  static Floats fnmadd(const Floats& a, const Floats& b, const Floats& c) { return feach([&](int l) { return std::fma(-a[l], b[l], c[l]); }); }
  static Floats fset(float v) { return feach([&](int) { return v; }); }
  static Floats fzero() { return fset(0.f); }
  static void store(float* p, const Floats& v) { std::memcpy(p, v.data(), sizeof(v)); }
  static void prefetch(const uint8_t*, int) {}
};

namespace portable {
#include "tiles.h"
#include "attention.h"
void columns_portable(const Job& job, int64_t g0, int64_t g1) { columns<PortableLanes>(job, g0, g1); }
}  // namespace portable

#ifdef LLMCAD_X86
// Each SIMD path: its lane operations and the kernels of tiles.h, compiled for its instruction
// set (the standard headers are all included above, outside these regions).

// Request the cache lines of `bytes` from p on, each by an asm statement, not _mm_prefetch:
// GCC 12 dropped a whole loop of _mm_prefetch from some kernels (Q6_K's, one row, AVX2),
// which then read 25-35% slower from memory. The x86 lanes' `prefetch`.
ALWAYS_INLINE void prefetch_lines(const uint8_t* p, int bytes) {
  for (int l = 0; l < bytes; l += 64) asm volatile("prefetcht0 %0" : : "m"(p[l]));
}

// SEVERAL_ROWS, the options tiles.h compiles its several-row kernels with: on the 16-register
// paths (AVX2, AVX-VNNI), scheduled for register pressure before register allocation (GCC
// leaves that off on x86): without it GCC 12 computed a run's maddubs for all 4 rows before
// adding any and spilled half of them to the stack. AVX2, Zen 3, 2 threads, whole resident
// passes, the libraries swapped call by call: the draft (Q4_0 and Q4_K) at 4 / 8 / 16 rows
// 32 / 61 / 117 ms -> 26 / 48 / 89, the target (Q4_K and Q6_K) within 3%; one 8960x1536
// Q4_0 matrix in cache, one core, 4 / 8 rows 1.34 / 2.69 ms -> 0.94 / 1.93. One row keeps
// the default schedule (tiles.h's one_row): with this one, Q4_K's row from memory was 25%
// slower.
#define SEVERAL_ROWS_FOR_PRESSURE __attribute__((optimize("schedule-insns", "sched-pressure")))

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
// ---- AVX2 lanes (8 columns a register: 16 registers hold a few rows' work), with or without
// AVX-VNNI ------------------------------------------------------------------------------------

// Lane operations both AVX2 paths share; the dot products differ (Avx2Lanes, AvxVnniLanes).
struct Avx2Base {
  static constexpr int LANES = 8, ROWS = 4;
  using Bytes = __m256i;
  using Ints = __m256i;
  using Floats = __m256;
  static Bytes load(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static Bytes shr_and(Bytes v, int s, uint8_t m) { return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(s)), _mm256_set1_epi8((char)m)); }
  static Bytes shl_and(Bytes v, int s, uint8_t m) { return _mm256_and_si256(_mm256_sll_epi16(v, _mm_cvtsi32_si128(s)), _mm256_set1_epi8((char)m)); }
  static Bytes or_(Bytes a, Bytes b) { return _mm256_or_si256(a, b); }
  static Ints u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  static Ints u8_pairs(const uint8_t* p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p)); }
  static Ints i8_pairs(const uint8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
  static Ints low16(Ints v) { return _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16); }
  static Ints high16(Ints v) { return _mm256_srai_epi32(v, 16); }
  static Ints add(Ints a, Ints b) { return _mm256_add_epi32(a, b); }
  static Ints sub(Ints a, Ints b) { return _mm256_sub_epi32(a, b); }
  static Ints mul(Ints a, Ints b) { return _mm256_mullo_epi32(a, b); }
  static Ints shl(Ints v, int s) { return _mm256_sll_epi32(v, _mm_cvtsi32_si128(s)); }
  static Ints set(int32_t v) { return _mm256_set1_epi32(v); }
  static Floats halves(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static Floats cvt(Ints v) { return _mm256_cvtepi32_ps(v); }
  static Floats fmul(Floats a, Floats b) { return _mm256_mul_ps(a, b); }
  static Floats fmadd(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }
  static Floats fnmadd(Floats a, Floats b, Floats c) { return _mm256_fnmadd_ps(a, b, c); }
  static Floats fset(float v) { return _mm256_set1_ps(v); }
  static Floats fzero() { return _mm256_setzero_ps(); }
  static void store(float* p, Floats v) { _mm256_storeu_ps(p, v); }
  static void prefetch(const uint8_t* p, int bytes) { prefetch_lines(p, bytes); }
  static __m256i broadcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
};

// AVX2 alone: maddubs (pairs of u8 x s8 into int16), summed in int16 over a run, then madd
// with ones into int32: exact while the run's sums fit int16 (activations are within +-127),
// so a run of 4-bit codes is a whole 32-weight sub-block. Wide codes are split into their low
// 7 bits and bit 7.
struct Avx2Lanes : Avx2Base {
  using Part = __m256i;  // int16 pairs
  static constexpr int run(int maxcode) { return 32767 / (2 * 127 * maxcode); }
  static Part begin(Ints) { return _mm256_setzero_si256(); }
  static Part dot(Part part, Bytes w, const int8_t* x) { return _mm256_add_epi16(part, _mm256_maddubs_epi16(w, broadcast4(x))); }
  static Ints end(Ints acc, Part part) { return _mm256_add_epi32(acc, _mm256_madd_epi16(part, _mm256_set1_epi16(1))); }
  using Scale = __m256i;  // the scale in both int16 halves of a lane: madd applies it to the run's int16 sums
  static Scale scale_u8(const uint8_t* p) {
    const __m128i v = _mm_loadl_epi64((const __m128i*)p);
    return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v));
  }
  static Scale scale_half(Ints v, int h) {  // int16 half h of each lane, into both (byte indices within 128 bits)
    const __m256i low = _mm256_setr_epi8(0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13);
    return _mm256_shuffle_epi8(v, h ? _mm256_add_epi8(low, _mm256_set1_epi8(2)) : low);
  }
  static Ints end_scaled(Ints acc, Part part, Scale s) { return _mm256_add_epi32(acc, _mm256_madd_epi16(part, s)); }
  static Ints wide_dot(Ints acc, Bytes w, const int8_t* x) {
    const __m256i xv = broadcast4(x), ones = _mm256_set1_epi16(1);
    const __m256i low = _mm256_maddubs_epi16(_mm256_and_si256(w, _mm256_set1_epi8(0x7f)), xv);
    const __m256i top = _mm256_maddubs_epi16(_mm256_and_si256(w, _mm256_set1_epi8((char)0x80)), xv);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(low, ones), _mm256_madd_epi16(top, ones)));
  }
  static Ints pair_dot(Ints acc, Ints v, const int16_t* p) { return _mm256_add_epi32(acc, _mm256_madd_epi16(v, broadcast4(p))); }
};
#define SEVERAL_ROWS SEVERAL_ROWS_FOR_PRESSURE
#include "tiles.h"
#include "attention.h"
void columns_avx2(const Job& job, int64_t g0, int64_t g1) { columns<Avx2Lanes>(job, g0, g1); }
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace avxvnni {
struct AvxVnniLanes : avx2::Avx2Base {
  using Part = Ints;  // vpdpbusd accumulates in int32: a run is the whole sum
  static constexpr int run(int) { return 64; }
  static Part begin(Ints acc) { return acc; }
  static Part dot(Part part, Bytes w, const int8_t* x) { return _mm256_dpbusd_avx_epi32(part, w, broadcast4(x)); }
  static Ints end(Ints, Part part) { return part; }
  using Scale = Ints;
  static Scale scale_u8(const uint8_t* p) { return u8(p); }
  static Scale scale_half(Ints v, int h) { return h ? high16(v) : low16(v); }
  static Ints end_scaled(Ints acc, Part part, Scale s) { return add(acc, mul(part, s)); }
  static Ints wide_dot(Ints acc, Bytes w, const int8_t* x) { return dot(acc, w, x); }
  static Ints pair_dot(Ints acc, Ints v, const int16_t* p) { return _mm256_dpwssd_avx_epi32(acc, v, broadcast4(p)); }
};
#define SEVERAL_ROWS SEVERAL_ROWS_FOR_PRESSURE
#include "tiles.h"
#include "attention.h"
void columns_avxvnni(const Job& job, int64_t g0, int64_t g1) { columns<AvxVnniLanes>(job, g0, g1); }
}  // namespace avxvnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
namespace avx512 {
// ---- AVX-512 (F, BW, VL, VNNI) lanes --------------------------------------------------------

struct Avx512Lanes {
  static constexpr int LANES = 16, ROWS = 8;
  using Bytes = __m512i;
  using Ints = __m512i;
  using Floats = __m512;
  using Part = Ints;  // vpdpbusd accumulates in int32: a run is the whole sum
  static Bytes load(const uint8_t* p) { return _mm512_loadu_si512((const void*)p); }
  static Bytes shr_and(Bytes v, int s, uint8_t m) { return _mm512_and_si512(_mm512_srl_epi16(v, _mm_cvtsi32_si128(s)), _mm512_set1_epi8((char)m)); }
  static Bytes shl_and(Bytes v, int s, uint8_t m) { return _mm512_and_si512(_mm512_sll_epi16(v, _mm_cvtsi32_si128(s)), _mm512_set1_epi8((char)m)); }
  static Bytes or_(Bytes a, Bytes b) { return _mm512_or_si512(a, b); }
  static constexpr int run(int) { return 64; }
  static Part begin(Ints acc) { return acc; }
  static Part dot(Part part, Bytes w, const int8_t* x) {
    int32_t x4;
    std::memcpy(&x4, x, 4);
    return _mm512_dpbusd_epi32(part, w, _mm512_set1_epi32(x4));
  }
  static Ints end(Ints, Part part) { return part; }
  using Scale = Ints;
  static Scale scale_u8(const uint8_t* p) { return u8(p); }
  static Scale scale_half(Ints v, int h) { return h ? high16(v) : low16(v); }
  static Ints end_scaled(Ints acc, Part part, Scale s) { return _mm512_add_epi32(acc, _mm512_mullo_epi32(part, s)); }
  static Ints wide_dot(Ints acc, Bytes w, const int8_t* x) { return dot(acc, w, x); }
  static Ints pair_dot(Ints acc, Ints v, const int16_t* p) {
    int32_t p2;
    std::memcpy(&p2, p, 4);
    return _mm512_dpwssd_epi32(acc, v, _mm512_set1_epi32(p2));
  }
  static Ints u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static Ints u8_pairs(const uint8_t* p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
  static Ints i8_pairs(const uint8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
  static Ints low16(Ints v) { return _mm512_srai_epi32(_mm512_slli_epi32(v, 16), 16); }
  static Ints high16(Ints v) { return _mm512_srai_epi32(v, 16); }
  static Ints add(Ints a, Ints b) { return _mm512_add_epi32(a, b); }
  static Ints sub(Ints a, Ints b) { return _mm512_sub_epi32(a, b); }
  static Ints mul(Ints a, Ints b) { return _mm512_mullo_epi32(a, b); }
  static Ints shl(Ints v, int s) { return _mm512_sll_epi32(v, _mm_cvtsi32_si128(s)); }
  static Ints set(int32_t v) { return _mm512_set1_epi32(v); }
  static Floats halves(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static Floats cvt(Ints v) { return _mm512_cvtepi32_ps(v); }
  static Floats fmul(Floats a, Floats b) { return _mm512_mul_ps(a, b); }
  static Floats fmadd(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
  static Floats fnmadd(Floats a, Floats b, Floats c) { return _mm512_fnmadd_ps(a, b, c); }
  static Floats fset(float v) { return _mm512_set1_ps(v); }
  static Floats fzero() { return _mm512_setzero_ps(); }
  static void store(float* p, Floats v) { _mm512_storeu_ps(p, v); }
  static void prefetch(const uint8_t* p, int bytes) { prefetch_lines(p, bytes); }
};
#include "tiles.h"
#include "attention.h"
void columns_avx512(const Job& job, int64_t g0, int64_t g1) { columns<Avx512Lanes>(job, g0, g1); }
}  // namespace avx512
#pragma GCC pop_options

#endif  // LLMCAD_X86

bool path_supported(int path) {
  if (path == PORTABLE) return true;
#ifdef LLMCAD_X86
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (path == AVX2) return avx2;
  if (path == AVXVNNI) return avx2 && __builtin_cpu_supports("avxvnni");
  if (path == AVX512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
  return false;
}

// A path's functions: the activations' quantizer, the column kernels, attention, the gate.
struct Kernels {
  void (*quantize)(const float*, int64_t, int64_t, Activations&);
  void (*columns)(const Job&, int64_t, int64_t);
  void (*attend)(const AttentionJob&, int64_t, int64_t);
  void (*gate)(const float*, const float*, int64_t, float*);
};

Kernels kernels_for(int path) {
#ifdef LLMCAD_X86
  if (path == AVX512) return {avx512::quantize_rows<avx512::Avx512Lanes>, avx512::columns_avx512, avx512::attend_items, avx512::gate};
  if (path == AVXVNNI) return {avxvnni::quantize_rows<avxvnni::AvxVnniLanes>, avxvnni::columns_avxvnni, avxvnni::attend_items, avxvnni::gate};
  if (path == AVX2) return {avx2::quantize_rows<avx2::Avx2Lanes>, avx2::columns_avx2, avx2::attend_items, avx2::gate};
#endif
  return {portable::quantize_rows<PortableLanes>, portable::columns_portable, portable::attend_items, portable::gate};
}

// ---- threads ---------------------------------------------------------------------------------
// A persistent pool: the caller runs part 0 of a job, workers parts 1..n-1. Workers spin a
// little after each job (the next matmul usually follows within microseconds), then sleep.
// A second caller arriving while the pool is busy runs its whole job on its own thread.
class Pool {
 public:
  void run(int parts, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (parts <= 1 || !busy.owns_lock()) {
      for (int i = 0; i < parts; ++i) fn(i);
      return;
    }
    while ((int)workers_.size() < parts - 1) {
      int index = (int)workers_.size() + 1;
      uint64_t seen = generation_.load();  // the worker runs from the next job on
      workers_.emplace_back([this, index, seen] { work(index, seen); });
      workers_.back().detach();
    }
    fn_ = &fn;
    parts_ = parts;
    pending_.store(parts - 1);
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.notify_all();
    }
    fn(0);
    while (pending_.load(std::memory_order_acquire) > 0) pause();
  }

 private:
  static void pause() {
#ifdef LLMCAD_X86
    _mm_pause();
#endif
  }

  void work(int index, uint64_t seen) {
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spin = 0; generation_.load(std::memory_order_acquire) == seen; ++spin) {
        pause();
        if ((spin & 255) == 255 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(200)) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < parts_) (*fn_)(index);
      if (index < parts_) pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex busy_, mu_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0}, sleepers_{0};
  const std::function<void(int)>* fn_ = nullptr;
  int parts_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: detached workers may outlive static destructors
  return *p;
}

// PyTorch's own OpenMP runtime, when the caller hands us its entry points: our parts then run
// on the very threads PyTorch computes with, so the two never compete for cores (a spinning
// OpenMP worker would otherwise hold the core our pool's worker needs).
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
};
OpenMP openmp;

struct OpenMPTask {
  const std::function<void(int)>* fn;
  int parts;
};

void openmp_part(void* data) {
  auto* task = static_cast<OpenMPTask*>(data);
  for (int i = openmp.thread_num(); i < task->parts; i += openmp.num_threads()) (*task->fn)(i);  // a smaller team loops
}

void run_parts(int parts, const std::function<void(int)>& fn) {
  if (openmp.parallel && parts > 1) {
    OpenMPTask task{&fn, parts};
    openmp.parallel(openmp_part, &task, (unsigned)parts, 0);
  } else {
    pool().run(parts, fn);
  }
}

// items [0, count) split into up to `threads` contiguous ranges, part(i0, i1) run for each.
template <class Part>
void run_split(int64_t count, int threads, Part part) {
  const int parts = (int)std::max<int64_t>(1, std::min<int64_t>(threads, count));
  const int64_t per = (count + parts - 1) / parts;
  run_parts(parts, [&](int i) {
    const int64_t i0 = i * per, i1 = std::min(count, i0 + per);
    if (i0 < i1) part(i0, i1);
  });
}

}  // namespace

extern "C" {

#define LLMCAD_API __attribute__((visibility("default")))

// Run the parts of every later call on the OpenMP runtime whose GOMP_parallel,
// omp_get_thread_num and omp_get_num_threads these are (all null: the library's own pool).
LLMCAD_API void llmcad_use_openmp(void* parallel, void* thread_num, void* num_threads) {
  openmp.parallel = reinterpret_cast<decltype(openmp.parallel)>(parallel);
  openmp.thread_num = reinterpret_cast<decltype(openmp.thread_num)>(thread_num);
  openmp.num_threads = reinterpret_cast<decltype(openmp.num_threads)>(num_threads);
  if (!(openmp.parallel && openmp.thread_num && openmp.num_threads)) openmp = OpenMP();
}

// Bit i set where dispatch path i (0 portable, 1 AVX2, 2 AVX-VNNI, 3 AVX-512) runs on this CPU.
LLMCAD_API int llmcad_paths() {
  int mask = 0;
  for (int p = PORTABLE; p <= AVX512; ++p) mask |= path_supported(p) << p;
  return mask;
}

// This interface's version: raised whenever a function below changes its arguments, so that a
// library built from older sources is refused at load rather than called wrongly.
LLMCAD_API int llmcad_abi() { return 5; }

// Columns a packed tile holds: a packed matrix splits into whole tiles only at multiples of it.
LLMCAD_API int llmcad_tile_columns() { return TILE; }

// Bytes of one column of k weights of `qtype`, packed (0 for a bad type or k).
LLMCAD_API int64_t llmcad_packed_bytes(int qtype, int64_t k) {
  if (qtype < Q4_K || qtype > Q4_0 || k <= 0 || k % FORMATS[qtype].block) return 0;
  return k / FORMATS[qtype].block * packed_bytes(qtype);
}

// dst (n * llmcad_packed_bytes(into, k) bytes) = the tiles of type `into` of the GGUF matrix
// src (n rows of k weights of type `qtype`, `row_bytes` apart): its own blocks rearranged
// where into == qtype, else (into Q4_0 only) each block dequantized and requantized, as
// llmcad_dequantize and llmcad_quantize would. Returns 0, or -1 for a bad argument.
LLMCAD_API int llmcad_pack(int qtype, const uint8_t* src, int64_t row_bytes, int64_t n, int64_t k, int into, uint8_t* dst,
                           int threads) {
  if (!llmcad_packed_bytes(qtype, k) || n <= 0 || row_bytes != k / FORMATS[qtype].block * FORMATS[qtype].gguf_bytes) return -1;
  if (into != qtype && (into != Q4_0 || !llmcad_packed_bytes(into, k))) return -1;
  const int64_t blocks = k / FORMATS[qtype].block, per = FORMATS[qtype].block / FORMATS[into].block;  // into's blocks per block
  run_split(n, threads, [&](int64_t c0, int64_t c1) {
    Block b;
    float values[256];
    uint8_t q4_0[18];
    for (int64_t col = c0; col < c1; ++col)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        b = Block();
        read_gguf(qtype, src + col * row_bytes + blk * FORMATS[qtype].gguf_bytes, b);
        if (into != qtype) dequantize_block(qtype, b, values);
        for (int64_t j = 0; j < per; ++j) {
          if (into != qtype) {
            quantize_q4_0(values + 32 * j, q4_0);
            b = Block();
            read_gguf(into, q4_0, b);
          }
          int width;
          uint8_t* tile = const_cast<uint8_t*>(tile_at(into, dst, n, k, col / TILE, blk * per + j, width));
          write_tile(into, b, tile, width, (int)(col % TILE));
        }
      }
  });
  return 0;
}

// y[m, sum of ns] = x[m, k] [W_0; W_1; ...]^T for `count` matrices W_i (ns[i] x k, type
// qtypes[i], packed by llmcad_pack) that take the same input, such as a layer's q, k and v:
// W_i's products fill the ns[i] columns after W_{i-1}'s. x is quantized once and `threads`
// split the column tiles of all of them. Returns 0, or -1 for a bad argument (type, path,
// sizes).
LLMCAD_API int llmcad_matmul(int path, int count, const int* qtypes, const uint8_t* const* ws, const int64_t* ns, int64_t k,
                             const float* x, int64_t m, float* y, int threads) {
  if (!path_supported(path) || count <= 0 || m <= 0) return -1;
  std::vector<int64_t> first(count + 1, 0), column(count + 1, 0);  // each matrix's first column group and column
  for (int i = 0; i < count; ++i) {
    if (!llmcad_packed_bytes(qtypes[i], k) || ns[i] <= 0) return -1;
    first[i + 1] = first[i] + (ns[i] + TILE - 1) / TILE;
    column[i + 1] = column[i] + ns[i];
  }
  static thread_local Activations own;
  const Activations* a = &own;  // this thread's: the workers' lambda must not name the thread_local itself
  const Kernels kernels = kernels_for(path);
  kernels.quantize(x, m, k, own);
  run_split(first[count], threads, [&](int64_t g0, int64_t g1) {
    for (int i = 0; i < count; ++i) {
      const int64_t lo = std::max(g0, first[i]), hi = std::min(g1, first[i + 1]);
      if (lo < hi) kernels.columns(Job{qtypes[i], ws[i], ns[i], a, y + column[i], column[count]}, lo - first[i], hi - first[i]);
    }
  });
  return 0;
}

// The arguments both attention entry points check: a path this CPU runs, and query heads
// that share key/value heads evenly.
static bool attention_shape_ok(int path, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim) {
  return path_supported(path) && rows > 0 && kv_heads > 0 && heads % kv_heads == 0 && dim > 0;
}

// out[rows, heads, dim] = softmax(q k^T * scale, soft-capped where softcap > 0, masked) v for
// each query row and head, its key/value head being head / (heads / kv_heads), over the first
// `slots` slots of a cache layer holding `capacity`: keys transposed, k [kv_heads, dim,
// capacity], values v [kv_heads, capacity, dim]; mask [rows, slots] (nonzero: may attend) or
// null (all). Returns 0, or -1 for a bad argument.
LLMCAD_API int llmcad_attention(int path, const float* q, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, const float* k,
                                const float* v, int64_t capacity, int64_t slots, const uint8_t* mask, float scale, float softcap,
                                float* out, int threads) {
  if (!attention_shape_ok(path, rows, heads, kv_heads, dim) || slots <= 0 || capacity < slots) return -1;
  const AttentionJob job{q, k, v, mask, rows, heads, kv_heads, dim, slots, capacity, scale, softcap, out};
  const Kernels kernels = kernels_for(path);
  run_split(rows * heads, threads, [&](int64_t i0, int64_t i1) { kernels.attend(job, i0, i1); });
  return 0;
}

// out[dim] = the rotary embedding of x[dim] (half-split layout, on its first `rot` dims; the
// rest pass through) with cos and sin [rot]: x * cos + (-x2, x1) * sin, each product and the
// sum rounded on its own, as model.rotate computes it in PyTorch, so the same bits.
static void rotate_head(const float* x, const float* cos, const float* sin, int64_t rot, int64_t dim, float* out) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + -x[i + half] * sin[i];
  for (int64_t i = half; i < rot; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
  for (int64_t i = rot; i < dim; ++i) out[i] = x[i];
}

// A layer's attention for one pass in one call: its `rows` queries q and keys k rotated (cos
// and sin [rows, rot]), its keys and values v stored at cache slots start .. start + rows (the
// cache laid out as for llmcad_attention), then llmcad_attention over start + rows slots.
// q [rows, heads, dim], k and v [rows, kv_heads, dim]: each row's heads contiguous, rows
// q_stride, k_stride and v_stride floats apart. Returns 0, or -1 for a bad argument (the cache
// then unchanged).
LLMCAD_API int llmcad_rotary_attention(int path, const float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* v,
                                       int64_t v_stride, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, const float* cos,
                                       const float* sin, int64_t rot, float* k_cache, float* v_cache, int64_t capacity, int64_t start,
                                       const uint8_t* mask, float scale, float softcap, float* out, int threads) {
  if (!attention_shape_ok(path, rows, heads, kv_heads, dim) || start < 0 || capacity < start + rows || rot < 0 || rot > dim || rot % 2)
    return -1;  // before anything is written to the cache
  std::vector<float> rotated(rows * heads * dim), key(dim);
  for (int64_t t = 0; t < rows; ++t) {
    const float *c = cos + t * rot, *s = sin + t * rot;
    for (int64_t h = 0; h < heads; ++h) rotate_head(q + t * q_stride + h * dim, c, s, rot, dim, rotated.data() + (t * heads + h) * dim);
    for (int64_t h = 0; h < kv_heads; ++h) {
      rotate_head(k + t * k_stride + h * dim, c, s, rot, dim, key.data());
      for (int64_t d = 0; d < dim; ++d) k_cache[(h * dim + d) * capacity + start + t] = key[d];
      std::memcpy(v_cache + (h * capacity + start + t) * dim, v + t * v_stride + h * dim, sizeof(float) * dim);
    }
  }
  return llmcad_attention(path, rotated.data(), rows, heads, kv_heads, dim, k_cache, v_cache, capacity, start + rows, mask, scale, softcap,
                          out, threads);
}

// out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w for `rows` rows of `dim` floats (x's
// rows x_stride apart, out's contiguous): the squares summed in double, in 8 lanes in a fixed
// order, their mean rounded once to float; then PyTorch's sequence (x * rsqrt(mean + eps) *
// w), each float operation correctly rounded. A row's bits depend on that row alone.
LLMCAD_API int llmcad_rms_norm(const float* x, int64_t rows, int64_t dim, int64_t x_stride, const float* w, float eps, float* out) {
  if (rows < 0 || dim <= 0 || x_stride < dim) return -1;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * x_stride;
    double lanes[8] = {};
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += (double)xr[i + l] * xr[i + l];
    for (int l = 0; i < dim; ++i, ++l) lanes[l] += (double)xr[i] * xr[i];
    const double sum = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    const float inv = 1.f / std::sqrt((float)(sum / dim) + eps);
    for (i = 0; i < dim; ++i) out[r * dim + i] = xr[i] * inv * w[i];
  }
  return 0;
}

// One pre-norm decoder layer of the Llama family (Llama, Qwen2, Mistral, Phi-3: no q/k norms, no
// norms after the sublayers, a SwiGLU MLP), its matrices packed by llmcad_pack:
//   a = x + o(attention(rotary(q, k), v))   with q, k, v = qkv(rms_norm(x, attn_norm)) + their biases
//   out = a + down(silu(gate) * up)         with gate, up = gate_up(rms_norm(a, mlp_norm))
// each step the function named, so the bits of the model's calls one by one (llmcad_rms_norm,
// llmcad_matmul, llmcad_rotary_attention), but silu(g) = g / (1 + exp(-g)), its exp attention's
// polynomial (attention.h's `gate`: within an ulp or two of PyTorch's); silu(g) * u rounded
// after the silu and the product.
struct LlmcadLayer {
  const float* attn_norm;  // [hidden]
  const float* mlp_norm;   // [hidden]
  float eps;
  int qkv_types[3];
  const uint8_t* qkv[3];     // q [heads * dim, hidden], k and v [kv_heads * dim, hidden]
  const float* qkv_bias[3];  // q's, k's and v's biases, or null
  int o_type;
  const uint8_t* o;          // [hidden, heads * dim]
  int gate_up_types[2];
  const uint8_t* gate_up[2];  // gate and up [inter, hidden]
  int down_type;
  const uint8_t* down;  // [hidden, inter]
  int64_t hidden, inter, heads, kv_heads, dim;
  float scale, softcap;  // attention's (softcap 0: none)
};

// out[rows, hidden] = the layer above applied to x[rows, hidden] (out must not overlap x), its
// keys and values stored at cache slots start .. start + rows; cos, sin, the cache and mask as
// for llmcad_rotary_attention. Returns 0, or -1 for a bad argument (the cache then unchanged).
LLMCAD_API int llmcad_layer(int path, const LlmcadLayer* l, const float* x, int64_t rows, const float* cos, const float* sin, int64_t rot,
                            float* k_cache, float* v_cache, int64_t capacity, int64_t start, const uint8_t* mask, float* out,
                            int threads) {
  const int64_t q_cols = l->heads * l->dim, kv_cols = l->kv_heads * l->dim, qkv_cols = q_cols + 2 * kv_cols;
  if (!attention_shape_ok(path, rows, l->heads, l->kv_heads, l->dim) || l->hidden <= 0 || l->inter <= 0) return -1;
  for (int qtype : {l->qkv_types[0], l->qkv_types[1], l->qkv_types[2], l->gate_up_types[0], l->gate_up_types[1]})
    if (!llmcad_packed_bytes(qtype, l->hidden)) return -1;  // every product's arguments, before the cache is touched
  if (!llmcad_packed_bytes(l->o_type, q_cols) || !llmcad_packed_bytes(l->down_type, l->inter)) return -1;
  thread_local std::vector<float> h, qkv, attended, gate_up, act, sub;
  h.resize(rows * l->hidden);
  qkv.resize(rows * qkv_cols);
  attended.resize(rows * q_cols);
  gate_up.resize(rows * 2 * l->inter);
  act.resize(rows * l->inter);
  sub.resize(rows * l->hidden);
  const int64_t qkv_ns[3] = {q_cols, kv_cols, kv_cols}, gate_up_ns[2] = {l->inter, l->inter};
  if (llmcad_rms_norm(x, rows, l->hidden, l->hidden, l->attn_norm, l->eps, h.data()) ||
      llmcad_matmul(path, 3, l->qkv_types, l->qkv, qkv_ns, l->hidden, h.data(), rows, qkv.data(), threads))
    return -1;
  int64_t first = 0;
  for (int i = 0; i < 3; first += qkv_ns[i++])
    if (l->qkv_bias[i])
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < qkv_ns[i]; ++c) qkv[r * qkv_cols + first + c] += l->qkv_bias[i][c];
  if (llmcad_rotary_attention(path, qkv.data(), qkv_cols, qkv.data() + q_cols, qkv_cols, qkv.data() + q_cols + kv_cols, qkv_cols, rows,
                              l->heads, l->kv_heads, l->dim, cos, sin, rot, k_cache, v_cache, capacity, start, mask, l->scale,
                              l->softcap, attended.data(), threads) ||
      llmcad_matmul(path, 1, &l->o_type, &l->o, &l->hidden, q_cols, attended.data(), rows, sub.data(), threads))
    return -1;
  for (int64_t i = 0; i < rows * l->hidden; ++i) out[i] = x[i] + sub[i];
  if (llmcad_rms_norm(out, rows, l->hidden, l->hidden, l->mlp_norm, l->eps, h.data()) ||
      llmcad_matmul(path, 2, l->gate_up_types, l->gate_up, gate_up_ns, l->hidden, h.data(), rows, gate_up.data(), threads))
    return -1;
  const Kernels kernels = kernels_for(path);
  for (int64_t r = 0; r < rows; ++r)
    kernels.gate(gate_up.data() + r * 2 * l->inter, gate_up.data() + (r * 2 + 1) * l->inter, l->inter, act.data() + r * l->inter);
  if (llmcad_matmul(path, 1, &l->down_type, &l->down, &l->hidden, l->inter, act.data(), rows, sub.data(), threads)) return -1;
  for (int64_t i = 0; i < rows * l->hidden; ++i) out[i] += sub[i];
  return 0;
}

// dst = the GGUF blocks (n rows of k / 32 * 18 bytes) of Q4_0 for x[n, k], as ggml's reference
// quantizer makes them: per block d = the value of largest magnitude / -8, codes
// min(15, trunc(x / d + 8.5)). Only Q4_0. Returns 0, or -1 for a bad argument.
LLMCAD_API int llmcad_quantize(int qtype, const float* x, int64_t n, int64_t k, uint8_t* dst, int threads) {
  if (qtype != Q4_0 || !llmcad_packed_bytes(qtype, k) || n <= 0) return -1;
  run_split(n * k / 32, threads, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) quantize_q4_0(x + 32 * b, dst + 18 * b);
  });
  return 0;
}

// out[n, k] = the weights of a packed matrix (the arithmetic of ggml's reference dequantizers).
LLMCAD_API int llmcad_dequantize(int qtype, const uint8_t* w, int64_t n, int64_t k, float* out, int threads) {
  if (!llmcad_packed_bytes(qtype, k) || n <= 0) return -1;
  const int64_t blocks = k / FORMATS[qtype].block;
  run_split(n, threads, [&](int64_t c0, int64_t c1) {
    Block b;
    for (int64_t col = c0; col < c1; ++col)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        int width;
        const uint8_t* tile = tile_at(qtype, w, n, k, col / TILE, blk, width);
        b = Block();
        read_tile(qtype, tile, width, (int)(col % TILE), b);
        dequantize_block(qtype, b, out + col * k + blk * FORMATS[qtype].block);
      }
  });
  return 0;
}

}  // extern "C"
