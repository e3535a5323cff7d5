// y = x W^T for W in GGUF's own quantized blocks (Q4_K, Q6_K, Q8_0, Q5_0), on the CPU.
//
// Each activation row is quantized on its own to int8 with one float scale per 256 values
// (the last group may be shorter) and int16 sums of every 16 quantized values, as llama.cpp's
// Q8_K does; the sums apply the weight's offsets (Q4_K mins, Q6_K's -32) with one multiply
// per group of 16 instead of one per weight.
//
// Batch invariance: for every output (row m, column n) the kernel performs the same sequence
// of operations whatever the number of rows in the call and whichever thread computes it.
// A weight super-block is decoded once into registers and then multiplied with each row in
// turn (AVX-512 K-quants: four columns' super-blocks, so a row's activations are loaded once
// for four columns), every (row, column) by the same code with its own accumulator; threads
// split the columns, never the reduction. So a token verified in a tree of 64 rows gets the
// bits it would get alone, on a given dispatch path (paths differ only in float summation
// order).
//
// Paths: portable C (the reference, any CPU), AVX2 (+FMA, F16C) and AVX-512 (F, BW, VL,
// VNNI); each SIMD path is compiled with function target attributes and chosen at run time
// from cpuid, so one build runs everywhere. Threads: PyTorch's OpenMP runtime when the caller
// hands over its entry points (llmcad_use_openmp), else a pool of our own. Interface: the
// extern "C" functions at the end.
#include <algorithm>
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

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMCAD_X86 1
#endif

namespace {

enum QType { Q4_K = 0, Q6_K = 1, Q8_0 = 2, Q5_0 = 3 };
enum Path { PORTABLE = 0, AVX2 = 1, AVX512 = 2 };

constexpr int SUPER = 256;     // activation scale group
constexpr int ROW_TILE = 64;   // rows whose activations stay in cache while a column is done
constexpr int PREFETCH = 16384; // bytes of weights requested ahead of the one being decoded (2048: 7.8 tok/s, 16384: 9.2, 1.5B decode)

struct Format { int block; int bytes; };
constexpr Format FORMATS[] = {{256, 144}, {256, 210}, {32, 34}, {32, 22}};

int group_bytes(int qtype) {  // bytes of one row's weights per SUPER columns
  return FORMATS[qtype].bytes * (SUPER / FORMATS[qtype].block);
}

float fp16(const uint8_t* p) {  // IEEE half -> float, exact
  uint16_t h;
  std::memcpy(&h, p, 2);
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

// Quantized activations: rows of `kpad` int8 (zero past k), a scale per SUPER values and
// the sum of every 16 quantized values.
struct Activations {
  int64_t m, k, kpad, groups;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> sums;
  const int8_t* qrow(int64_t r) const { return q.data() + r * kpad; }
  const float* drow(int64_t r) const { return d.data() + r * groups; }
  const int16_t* srow(int64_t r) const { return sums.data() + r * (kpad / 16); }
};

void quantize_rows(const float* x, int64_t m, int64_t k, Activations& a) {
  a.m = m;
  a.k = k;
  a.groups = (k + SUPER - 1) / SUPER;
  a.kpad = a.groups * SUPER;
  a.q.assign(m * a.kpad, 0);
  a.d.assign(m * a.groups, 0.f);
  a.sums.assign(m * (a.kpad / 16), 0);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    int8_t* q = a.q.data() + r * a.kpad;
    for (int64_t g = 0; g < a.groups; ++g) {
      int64_t lo = g * SUPER, hi = std::min<int64_t>(k, lo + SUPER);
      float amax = 0.f;
      for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(xr[i]));
      float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t i = lo; i < hi; ++i) q[i] = (int8_t)std::max(-127.f, std::min(127.f, std::nearbyint(xr[i] * id)));
      a.d[r * a.groups + g] = d;
    }
    int16_t* s = a.sums.data() + r * (a.kpad / 16);
    for (int64_t i = 0; i < a.kpad / 16; ++i) {
      int sum = 0;
      for (int j = 0; j < 16; ++j) sum += q[16 * i + j];
      s[i] = (int16_t)sum;
    }
  }
}

// Work for one thread: columns [n0, n1) of all rows.
struct Job {
  int qtype;
  const uint8_t* w;
  int64_t row_bytes;
  const Activations* a;
  float* y;  // [m, n]
  int64_t n;
};

// ---- portable C ------------------------------------------------------------------------

// A super-block (or, for 32-blocks, a group of up to 8 blocks) decoded to integers.
struct Decoded {
  int8_t q[SUPER];   // codes as the dot product sees them (signed for Q8_0/Q5_0)
  int16_t scale[16]; // K-quants: integer scale per 16 weights
  int16_t off[16];   // K-quants: integer offset per 16 weights (times B)
  float a, b;        // K-quants: y += dx * (a * sum(scale*q*x) - b * sum(off*xsum))
  float d[8];        // 32-blocks: float scale per block
  int blocks;        // 32-blocks in this group
};

void decode_portable(int qtype, const uint8_t* row, int64_t k, int64_t g, Decoded& o) {
  if (qtype == Q4_K) {
    const uint8_t* b = row + g * 144;
    uint8_t sc[8], mn[8];
    q4k_scales(b + 4, sc, mn);
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) {
        o.q[64 * c + l] = b[16 + 32 * c + l] & 0xf;
        o.q[64 * c + 32 + l] = b[16 + 32 * c + l] >> 4;
      }
    for (int i = 0; i < 16; ++i) { o.scale[i] = sc[i / 2]; o.off[i] = mn[i / 2]; }
    o.a = fp16(b);
    o.b = fp16(b + 2);
  } else if (qtype == Q6_K) {
    const uint8_t* b = row + g * 210;
    const uint8_t *ql = b, *qh = b + 128;
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 32; ++l) {
        int8_t* q = o.q + 128 * h;
        const uint8_t *L = ql + 64 * h, *H = qh + 32 * h;
        q[l] = (L[l] & 0xf) | ((H[l] & 3) << 4);
        q[l + 32] = (L[l + 32] & 0xf) | (((H[l] >> 2) & 3) << 4);
        q[l + 64] = (L[l] >> 4) | (((H[l] >> 4) & 3) << 4);
        q[l + 96] = (L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4);
      }
    for (int i = 0; i < 16; ++i) { o.scale[i] = (int8_t)b[192 + i]; o.off[i] = 32 * o.scale[i]; }
    o.a = o.b = fp16(b + 208);
  } else {
    int64_t first = g * 8;
    o.blocks = (int)std::min<int64_t>(8, k / 32 - first);
    for (int j = 0; j < o.blocks; ++j) {
      int8_t* q = o.q + 32 * j;
      if (qtype == Q8_0) {
        const uint8_t* b = row + (first + j) * 34;
        o.d[j] = fp16(b);
        std::memcpy(q, b + 2, 32);
      } else {
        const uint8_t* b = row + (first + j) * 22;
        uint32_t qh;
        std::memcpy(&qh, b + 2, 4);
        o.d[j] = fp16(b);
        for (int l = 0; l < 16; ++l) {
          q[l] = (int8_t)(((b[6 + l] & 0xf) | (((qh >> l) & 1) << 4)) - 16);
          q[l + 16] = (int8_t)(((b[6 + l] >> 4) | (((qh >> (l + 16)) & 1) << 4)) - 16);
        }
      }
    }
  }
}

void columns_portable(const Job& job, int64_t n0, int64_t n1) {
  const Activations& a = *job.a;
  const bool kquant = job.qtype == Q4_K || job.qtype == Q6_K;
  Decoded dec;
  std::vector<float> acc(ROW_TILE), acco(ROW_TILE);
  for (int64_t m0 = 0; m0 < a.m; m0 += ROW_TILE) {
    int64_t m1 = std::min(a.m, m0 + ROW_TILE);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = job.w + n * job.row_bytes;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(acco.begin(), acco.end(), 0.f);
      for (int64_t g = 0; g < a.groups; ++g) {
        decode_portable(job.qtype, row, a.k, g, dec);
        for (int64_t r = m0; r < m1; ++r) {
          const int8_t* x = a.qrow(r) + g * SUPER;
          float dx = a.drow(r)[g];
          if (kquant) {
            const int16_t* xs = a.srow(r) + g * 16;
            int32_t sumi = 0, offs = 0;
            for (int i = 0; i < 16; ++i) {
              int32_t dot = 0;
              for (int l = 0; l < 16; ++l) dot += dec.q[16 * i + l] * x[16 * i + l];
              sumi += dec.scale[i] * dot;
              offs += dec.off[i] * xs[i];
            }
            acc[r - m0] += (float)sumi * (dec.a * dx);
            acco[r - m0] += (float)offs * (dec.b * dx);
          } else {
            for (int j = 0; j < dec.blocks; ++j) {
              int32_t dot = 0;
              for (int l = 0; l < 32; ++l) dot += dec.q[32 * j + l] * x[32 * j + l];
              acc[r - m0] += (float)dot * (dec.d[j] * dx);
            }
          }
        }
      }
      for (int64_t r = m0; r < m1; ++r) job.y[r * job.n + n] = acc[r - m0] - acco[r - m0];
    }
  }
}

#ifdef LLMCAD_X86
// ---- AVX2 --------------------------------------------------------------------------------
#define AVX2_FNS __attribute__((target("avx2,fma,f16c")))

AVX2_FNS inline float half(const uint8_t* p) {  // fp16 -> float by F16C: exact, as fp16()
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

AVX2_FNS inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 bytes whose byte i is 0x10 where bit i of `bits` is set (Q5_0's fifth bit).
AVX2_FNS inline __m256i fifth_bits(uint32_t bits) {
  const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201LL);
  __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread), select);
  return _mm256_and_si256(_mm256_cmpeq_epi8(b, select), _mm256_set1_epi8(0x10));
}

AVX2_FNS void columns_avx2(const Job& job, int64_t n0, int64_t n1) {
  const Activations& a = *job.a;
  const int qtype = job.qtype;
  const bool kquant = qtype == Q4_K || qtype == Q6_K;
  const int gbytes = group_bytes(qtype);
  const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
  alignas(32) static thread_local float acc[ROW_TILE * 8], acco[ROW_TILE * 8];
  __m256i W[8];         // the super-block's codes, 32 per register
  alignas(32) int16_t S[8][16];  // K-quants: the scale of each int16 lane
  __m256i OFF = _mm256_setzero_si256();
  float A = 0.f, B = 0.f, D[8] = {0};
  int blocks = 8;
  for (int64_t m0 = 0; m0 < a.m; m0 += ROW_TILE) {
    int64_t m1 = std::min(a.m, m0 + ROW_TILE);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = job.w + n * job.row_bytes;
      std::memset(acc, 0, sizeof(float) * 8 * (m1 - m0));
      std::memset(acco, 0, sizeof(float) * 8 * (m1 - m0));
      for (int64_t g = 0; g < a.groups; ++g) {
        const uint8_t* ahead = row + g * gbytes + PREFETCH;  // the weights stream: keep it ahead
        for (int l = 0; l < gbytes; l += 64) _mm_prefetch((const char*)(ahead + l), _MM_HINT_T0);
        if (qtype == Q4_K) {
          const uint8_t* b = row + g * 144;
          uint8_t sc[8], mn[8];
          q4k_scales(b + 4, sc, mn);
          for (int c = 0; c < 4; ++c) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * c));
            W[2 * c] = _mm256_and_si256(v, m4);
            W[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          }
          alignas(32) int16_t off[16];
          for (int i = 0; i < 16; ++i) { S[i / 2][i % 2 * 8] = sc[i / 2]; off[i] = mn[i / 2]; }
          OFF = _mm256_load_si256((const __m256i*)off);
          A = half(b);
          B = half(b + 2);
        } else if (qtype == Q6_K) {
          const uint8_t* b = row + g * 210;
          for (int h = 0; h < 2; ++h) {
            __m256i L0 = _mm256_loadu_si256((const __m256i*)(b + 64 * h));
            __m256i L1 = _mm256_loadu_si256((const __m256i*)(b + 64 * h + 32));
            __m256i H = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h));
            W[4 * h] = _mm256_or_si256(_mm256_and_si256(L0, m4), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30));
            W[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(L1, m4), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30));
            W[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L0, 4), m4), _mm256_and_si256(H, m30));
            W[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(H, 2), m30));
          }
          alignas(32) int16_t sc[16];
          for (int i = 0; i < 16; ++i) { sc[i] = (int8_t)b[192 + i]; S[i / 2][i % 2 * 8] = sc[i]; }
          OFF = _mm256_slli_epi16(_mm256_load_si256((const __m256i*)sc), 5);
          A = B = half(b + 208);
        } else {
          int64_t first = g * 8;
          blocks = (int)std::min<int64_t>(8, a.k / 32 - first);
          for (int j = 0; j < blocks; ++j) {
            if (qtype == Q8_0) {
              const uint8_t* b = row + (first + j) * 34;
              D[j] = half(b);
              W[j] = _mm256_loadu_si256((const __m256i*)(b + 2));
            } else {
              const uint8_t* b = row + (first + j) * 22;
              uint32_t qh;
              std::memcpy(&qh, b + 2, 4);
              D[j] = half(b);
              __m128i qs = _mm_loadu_si128((const __m128i*)(b + 6));
              __m256i v = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
              v = _mm256_or_si256(_mm256_and_si256(v, m4), fifth_bits(qh));
              W[j] = _mm256_sub_epi8(v, _mm256_set1_epi8(16));
            }
          }
        }
        if (kquant) {
          for (int j = 0; j < 8; ++j)  // fill each half of the lane scales
            for (int l = 1; l < 8; ++l) { S[j][l] = S[j][0]; S[j][8 + l] = S[j][8]; }
          for (int64_t r = m0; r < m1; ++r) {
            const int8_t* x = a.qrow(r) + g * SUPER;
            float dx = a.drow(r)[g];
            __m256i sumi = _mm256_setzero_si256();
            for (int j = 0; j < 8; ++j) {
              __m256i p = _mm256_maddubs_epi16(W[j], _mm256_loadu_si256((const __m256i*)(x + 32 * j)));
              sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, _mm256_load_si256((const __m256i*)S[j])));
            }
            __m256i offs = _mm256_madd_epi16(OFF, _mm256_loadu_si256((const __m256i*)(a.srow(r) + g * 16)));
            float* ar = acc + 8 * (r - m0);
            float* aor = acco + 8 * (r - m0);
            _mm256_store_ps(ar, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(A * dx), _mm256_load_ps(ar)));
            _mm256_store_ps(aor, _mm256_fmadd_ps(_mm256_cvtepi32_ps(offs), _mm256_set1_ps(B * dx), _mm256_load_ps(aor)));
          }
        } else {
          for (int64_t r = m0; r < m1; ++r) {
            const int8_t* x = a.qrow(r) + g * SUPER;
            float dx = a.drow(r)[g];
            float* ar = acc + 8 * (r - m0);
            __m256 v = _mm256_load_ps(ar);
            for (int j = 0; j < blocks; ++j) {
              __m256i xv = _mm256_loadu_si256((const __m256i*)(x + 32 * j));
              __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(W[j]), _mm256_sign_epi8(xv, W[j]));
              v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_set1_ps(D[j] * dx), v);
            }
            _mm256_store_ps(ar, v);
          }
        }
      }
      for (int64_t r = m0; r < m1; ++r)
        job.y[r * job.n + n] = hsum8(_mm256_load_ps(acc + 8 * (r - m0))) - hsum8(_mm256_load_ps(acco + 8 * (r - m0)));
    }
  }
}

// ---- AVX-512 (F, BW, VL, VNNI) --------------------------------------------------------------
#define AVX512_FNS __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// One K-quant super-block of one column decoded: its 256 codes in four registers (64 each, in
// the activations' order), the int16 scale of every maddubs lane, the offsets per 16 weights.
struct KBlock {
  __m512i w[4], s[4];
  __m256i off;
  float a, b;  // y += dx * (a * sum(s * w * x) - b * sum(off * xsum))
};

AVX512_FNS inline void decode_kquant_avx512(int qtype, const uint8_t* b, KBlock& o) {
  const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
  __m256i lane_scales;  // one int16 scale per 16 weights
  if (qtype == Q4_K) {
    const __m512i upper4 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);  // shift 0 | 4
    alignas(32) uint8_t sc[8], mn[8];
    q4k_scales(b + 4, sc, mn);
    for (int c = 0; c < 4; ++c) {
      __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(b + 16 + 32 * c)));
      o.w[c] = _mm512_and_si512(_mm512_srlv_epi16(v, upper4), m4);
    }
    const __m256i pairs = _mm256_setr_epi16(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    lane_scales = _mm256_permutexvar_epi16(pairs, _mm256_castsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)sc))));
    o.off = _mm256_permutexvar_epi16(pairs, _mm256_castsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)mn))));
    o.a = half(b);
    o.b = half(b + 2);
  } else {  // Q6_K
    const __m512i upper2 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);  // shift 0 | 2
    const __m512i shl42 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);     // shift 4 | 2
    for (int h = 0; h < 2; ++h) {
      __m512i L = _mm512_loadu_si512((const void*)(b + 64 * h));
      __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h)));
      o.w[2 * h] = _mm512_or_si512(_mm512_and_si512(L, m4), _mm512_and_si512(_mm512_sllv_epi16(H, shl42), m30));
      o.w[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4), _mm512_and_si512(_mm512_srlv_epi16(H, upper2), m30));
    }
    lane_scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(b + 192)));
    o.off = _mm256_slli_epi16(lane_scales, 5);
    o.a = o.b = half(b + 208);
  }
  const __m512i group = _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                                           15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3);
  for (int c = 0; c < 4; ++c)  // lane i of chunk c holds weights 64c + 2i, 2i+1: group 4c + i/8
    o.s[c] = _mm512_permutexvar_epi16(_mm512_add_epi16(_mm512_set1_epi16(4 * c), group), _mm512_castsi256_si512(lane_scales));
}

// Super-blocks of weights decoded at a time, ahead of the rows that use them (8 x 4 columns x 576
// bytes stay in L1): more weight lines in flight. Against one at a time, measured on one 8960 x
// 1536 matrix: one row 18-22% faster, 4 rows 5-11%, 16 and 64 rows 3-7% slower. Results do not
// depend on it (each row's sums run in the same order).
constexpr int SPAN = 8;

// Columns n..n+NC-1, rows m0..m1, K-quants: SPAN super-blocks of the NC columns are decoded at
// once, then each row runs over them, its sums in registers, its activations loaded once for
// the NC columns. Each (row, column) runs the same instructions in the same order whatever NC
// and the rows beside it, so NC is free to vary with the column count.
template <int NC>
AVX512_FNS void kquant_columns_avx512(const Job& job, int64_t n, int64_t m0, int64_t m1) {
  const Activations& a = *job.a;
  const int gbytes = group_bytes(job.qtype);
  alignas(64) static thread_local float acc[ROW_TILE * NC * 16], acco[ROW_TILE * NC * 8];
  alignas(64) KBlock blk[SPAN * NC];  // 18 KB of stack
  std::memset(acc, 0, sizeof(float) * 16 * NC * (m1 - m0));
  std::memset(acco, 0, sizeof(float) * 8 * NC * (m1 - m0));
  for (int64_t g0 = 0; g0 < a.groups; g0 += SPAN) {
    const int64_t span = std::min<int64_t>(SPAN, a.groups - g0);
    for (int64_t g = 0; g < span; ++g)
      for (int c = 0; c < NC; ++c) {
        const uint8_t* b = job.w + (n + c) * job.row_bytes + (g0 + g) * gbytes;
        for (int l = 0; l < gbytes; l += 64) _mm_prefetch((const char*)(b + PREFETCH + l), _MM_HINT_T0);
        decode_kquant_avx512(job.qtype, b, blk[g * NC + c]);
      }
    for (int64_t r = m0; r < m1; ++r) {
      float* ar = acc + 16 * NC * (r - m0);
      float* aor = acco + 8 * NC * (r - m0);
      __m512 sum[NC];
      __m256 off[NC];
      for (int c = 0; c < NC; ++c) {
        sum[c] = _mm512_load_ps(ar + 16 * c);
        off[c] = _mm256_load_ps(aor + 8 * c);
      }
      for (int64_t g = 0; g < span; ++g) {
        const KBlock* b = blk + g * NC;
        const int8_t* x = a.qrow(r) + (g0 + g) * SUPER;
        const float dx = a.drow(r)[g0 + g];
        __m512i xv[4];
        for (int k = 0; k < 4; ++k) xv[k] = _mm512_loadu_si512((const void*)(x + 64 * k));
        const __m256i xsums = _mm256_loadu_si256((const __m256i*)(a.srow(r) + (g0 + g) * 16));
        for (int c = 0; c < NC; ++c) {
          __m512i sumi = _mm512_setzero_si512();
          for (int k = 0; k < 4; ++k) sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(b[c].w[k], xv[k]), b[c].s[k]);
          __m256i offs = _mm256_madd_epi16(b[c].off, xsums);
          sum[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(b[c].a * dx), sum[c]);
          off[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(offs), _mm256_set1_ps(b[c].b * dx), off[c]);
        }
      }
      for (int c = 0; c < NC; ++c) {
        _mm512_store_ps(ar + 16 * c, sum[c]);
        _mm256_store_ps(aor + 8 * c, off[c]);
      }
    }
  }
  for (int64_t r = m0; r < m1; ++r)
    for (int c = 0; c < NC; ++c) {
      float s = _mm512_reduce_add_ps(_mm512_load_ps(acc + 16 * (NC * (r - m0) + c)));
      job.y[r * job.n + n + c] = s - hsum8(_mm256_load_ps(acco + 8 * (NC * (r - m0) + c)));
    }
}

AVX512_FNS void columns_avx512(const Job& job, int64_t n0, int64_t n1) {
  const Activations& a = *job.a;
  const int qtype = job.qtype;
  if (qtype == Q4_K || qtype == Q6_K) {
    constexpr int NC = 4;  // columns sharing each row's activation loads
    for (int64_t m0 = 0; m0 < a.m; m0 += ROW_TILE) {
      int64_t m1 = std::min(a.m, m0 + ROW_TILE), n = n0;
      for (; n + NC <= n1; n += NC) kquant_columns_avx512<NC>(job, n, m0, m1);
      for (; n < n1; ++n) kquant_columns_avx512<1>(job, n, m0, m1);
    }
    return;
  }
  // Q8_0, Q5_0: eight 32-blocks (one super-block's width) per group, SPAN groups decoded at once
  const int gbytes = group_bytes(qtype);
  alignas(64) static thread_local float acc[ROW_TILE * 16];
  __m512i AW[SPAN][4];
  __m512 D[SPAN][4];
  __mmask64 NEG[SPAN][4];
  int chunks[SPAN];
  for (int64_t m0 = 0; m0 < a.m; m0 += ROW_TILE) {
    int64_t m1 = std::min(a.m, m0 + ROW_TILE);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = job.w + n * job.row_bytes;
      std::memset(acc, 0, sizeof(float) * 16 * (m1 - m0));
      for (int64_t g0 = 0; g0 < a.groups; g0 += SPAN) {
        const int64_t span = std::min<int64_t>(SPAN, a.groups - g0);
        for (int64_t s = 0; s < span; ++s) {
          const int64_t g = g0 + s;
          const uint8_t* ahead = row + g * gbytes + PREFETCH;  // the weights stream: keep it ahead
          for (int l = 0; l < gbytes; l += 64) _mm_prefetch((const char*)(ahead + l), _MM_HINT_T0);
          int64_t first = g * 8;
          int blocks = (int)std::min<int64_t>(8, a.k / 32 - first);
          chunks[s] = (blocks + 1) / 2;
          for (int c = 0; c < chunks[s]; ++c) {
            __m256i pair[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            float d[2] = {0.f, 0.f};
            for (int h = 0; h < 2; ++h) {
              int j = 2 * c + h;
              float& dj = d[h];
              if (j < blocks) {
                if (qtype == Q8_0) {
                  const uint8_t* b = row + (first + j) * 34;
                  dj = half(b);
                  pair[h] = _mm256_loadu_si256((const __m256i*)(b + 2));
                } else {
                  const uint8_t* b = row + (first + j) * 22;
                  uint32_t qh;
                  std::memcpy(&qh, b + 2, 4);
                  dj = half(b);
                  __m128i qs = _mm_loadu_si128((const __m128i*)(b + 6));
                  __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), _mm256_set1_epi8(0x0f));
                  v = _mm256_or_si256(v, _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10)));
                  pair[h] = _mm256_sub_epi8(v, _mm256_set1_epi8(16));
                }
              }
            }
            __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(pair[0]), pair[1], 1);
            AW[s][c] = _mm512_abs_epi8(v);
            NEG[s][c] = _mm512_movepi8_mask(v);
            D[s][c] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(d[0])),  // lanes of block 2c | 2c+1
                                                          _mm256_castps_pd(_mm256_set1_ps(d[1])), 1));
          }
        }
        for (int64_t r = m0; r < m1; ++r) {
          float* ar = acc + 16 * (r - m0);
          __m512 v = _mm512_load_ps(ar);
          for (int64_t s = 0; s < span; ++s) {
            const int8_t* x = a.qrow(r) + (g0 + s) * SUPER;
            __m512 dx = _mm512_set1_ps(a.drow(r)[g0 + s]);
            for (int c = 0; c < chunks[s]; ++c) {
              __m512i xv = _mm512_loadu_si512((const void*)(x + 64 * c));
              xv = _mm512_mask_sub_epi8(xv, NEG[s][c], _mm512_setzero_si512(), xv);
              __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), AW[s][c], xv);
              v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(D[s][c], dx), v);
            }
          }
          _mm512_store_ps(ar, v);
        }
      }
      for (int64_t r = m0; r < m1; ++r) job.y[r * job.n + n] = _mm512_reduce_add_ps(_mm512_load_ps(acc + 16 * (r - m0)));
    }
  }
}
#endif  // LLMCAD_X86

bool path_supported(int path) {
  if (path == PORTABLE) return true;
#ifdef LLMCAD_X86
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (path == AVX2) return avx2;
  if (path == AVX512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
  return false;
}

using ColumnsFn = void (*)(const Job&, int64_t, int64_t);

ColumnsFn columns_for(int path) {
#ifdef LLMCAD_X86
  if (path == AVX512) return columns_avx512;
  if (path == AVX2) return columns_avx2;
#endif
  return columns_portable;
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

// Bit i set where dispatch path i (0 portable, 1 AVX2, 2 AVX-512) runs on this CPU.
LLMCAD_API int llmcad_paths() {
  int mask = 0;
  for (int p = PORTABLE; p <= AVX512; ++p) mask |= path_supported(p) << p;
  return mask;
}

// y[m, n] = x[m, k] W^T for W of `qtype`, n rows of `row_bytes` bytes each; `threads` split
// the columns. Returns 0, or -1 for a bad argument (type, path, or k not fitting the blocks).
LLMCAD_API int llmcad_matmul(int path, int qtype, const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k,
                  const float* x, int64_t m, float* y, int threads) {
  if (qtype < Q4_K || qtype > Q5_0 || !path_supported(path) || k <= 0 || n <= 0 || m <= 0) return -1;
  const Format f = FORMATS[qtype];
  if (k % f.block || row_bytes != k / f.block * f.bytes) return -1;
  static thread_local Activations a;
  quantize_rows(x, m, k, a);
  Job job{qtype, w, row_bytes, &a, y, n};
  ColumnsFn columns = columns_for(path);
  int64_t step = 16;  // columns per part come in 16s so parts stay cache-line friendly
  int parts = (int)std::max<int64_t>(1, std::min<int64_t>(threads, n / step));
  int64_t per = (n + parts - 1) / parts;
  run_parts(parts, [&](int i) {
    int64_t n0 = i * per, n1 = std::min(n, n0 + per);
    if (n0 < n1) columns(job, n0, n1);
  });
  return 0;
}

// out[rows, k] = the dequantized weights (the same arithmetic as ggml's reference).
LLMCAD_API int llmcad_dequantize(int qtype, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t k, float* out) {
  if (qtype < Q4_K || qtype > Q5_0) return -1;
  const Format f = FORMATS[qtype];
  if (k % f.block || row_bytes != k / f.block * f.bytes) return -1;
  Decoded dec;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = w + r * row_bytes;
    float* o = out + r * k;
    for (int64_t g = 0; g * SUPER < k; ++g) {
      decode_portable(qtype, row, k, g, dec);
      if (qtype == Q4_K || qtype == Q6_K) {
        for (int i = 0; i < SUPER; ++i) o[g * SUPER + i] = dec.a * dec.scale[i / 16] * dec.q[i] - dec.b * dec.off[i / 16];
      } else {
        for (int i = 0; i < 32 * dec.blocks; ++i) o[g * SUPER + i] = dec.d[i / 32] * dec.q[i];
      }
    }
  }
  return 0;
}

}  // extern "C"
