// The matmul kernels over 16 lanes, one per column of a tile: included by qmatmul.cpp once
// per instruction set, inside a namespace compiled for it, with the names it defines
// (Activations, Job, FORMATS, ...) in scope, and optionally SEVERAL_ROWS, the attributes of the
// several-row kernels (scheduling options; none if undefined). Not a standalone header.
//
// A `Lanes` struct supplies its register types, one lane per column: Bytes (4 bytes a lane),
// Ints (int32), Floats, Part (a run's partial dot products); LANES, the columns one register
// holds (16 or 8: a tile is computed in TILE / LANES passes); ROWS, the rows a decoded tile
// serves at once (what fits the register file); and:
//   load(p)                 4 * LANES bytes
//   shr_and(v, s, m)        each byte (b >> s) & m; shl_and likewise with <<
//   or_(a, b)
//   begin(acc), dot(part, w, x), end(acc, part)
//                           a run of dot products: end(acc, dot(... dot(begin(acc), w1, x1) ...))
//                           = acc + per lane sum of its 4 unsigned bytes of each w times x[0..3]
//                           (int8), for codes <= c and runs of at most run(c) products
//   scale_u8(p), scale_half(v, h), end_scaled(acc, part, s)
//                           acc + s * the run's sum, for a run begun at zero, s a Scale: the
//                           LANES bytes at p, or int16 half h of each lane of v
//   wide_dot(acc, w, x)     acc + one such product, for any unsigned codes
//   pair_dot(acc, v, p)     acc + per lane low16(v) * p[0] + high16(v) * p[1] (int16)
//   u8(p), u8_pairs(p), i8_pairs(p)   LANES bytes as int32 lanes; 2 * LANES as int16 pairs
//   low16(v), high16(v)     the int16 halves of each lane, sign-extended
//   add, sub, mul (int32), shl(v, s), set(int)
//   halves(p)               LANES fp16 as floats; cvt(Ints); fmul, fmadd(a, b, c) = a*b + c
//                           (one rounding), fnmadd(a, b, c) = c - a*b (one rounding)
//   fset(float), fzero(), store(p, v), prefetch(p, bytes)

// Each row of x quantized on its own (see qmatmul.cpp's header): codes, scales, sums. Plain
// loops over 16 lanes of integer or correctly rounded IEEE operations, nothing reassociated,
// so each instruction set's vectorization of them gives the portable path's bits. Rounding
// to nearest even adds and subtracts 1.5 * 2^23 (the values are within +-127.5). The codes of
// each group of V::ROWS rows (the last group: the rows left) are interleaved 4 at a time, as
// the kernels read them (Rows).
template <class V>
void quantize_rows(const float* x, int64_t m, int64_t k, Activations& a) {
  constexpr float ROUND = 12582912.f;
  a.m = m;
  a.k = k;
  a.groups = (k + SUPER - 1) / SUPER;
  a.kpad = a.groups * SUPER;
  a.q.resize(m * a.kpad);
  a.d.assign(m * a.groups, 0.f);
  a.s16.resize(m * (a.kpad / 16));
  a.s32.resize(m * (a.kpad / 32));
  a.row.assign(a.kpad, 0);  // the padding past k stays zero
  // int8 stores may alias anything: without restrict GCC reloaded every pointer after each
  // and left the rounding loop scalar (2.3 ns a value, ~1 ms of a one-row target pass on AVX2)
  int8_t* __restrict q = a.row.data();
  for (int64_t r = 0; r < m; ++r) {
    const float* __restrict xr = x + r * k;
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t lo = g * SUPER, hi = std::min<int64_t>(k, lo + SUPER);
      // the largest magnitude: |v|'s bits, compared as integers, order as |v| does
      uint32_t lanes[TILE] = {}, bits[TILE];
      int64_t i = lo;
      for (; i + TILE <= hi; i += TILE) {
        std::memcpy(bits, xr + i, sizeof(bits));
        for (int l = 0; l < TILE; ++l) lanes[l] = std::max(lanes[l], bits[l] & 0x7fffffffu);
      }
      for (; i < hi; ++i) {
        std::memcpy(bits, xr + i, 4);
        lanes[0] = std::max(lanes[0], bits[0] & 0x7fffffffu);
      }
      uint32_t top = 0;
      for (int l = 0; l < TILE; ++l) top = std::max(top, lanes[l]);
      float amax;
      std::memcpy(&amax, &top, 4);
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      for (i = lo; i < hi; ++i) {
        const float v = std::min(127.f, std::max(-127.f, xr[i] * id));
        q[i] = (int8_t)(int)((v + ROUND) - ROUND);
      }
      a.d[r * a.groups + g] = amax / 127.f;
    }
    int16_t *s16 = a.s16.data() + r * (a.kpad / 16), *s32 = a.s32.data() + r * (a.kpad / 32);
    for (int64_t i = 0; i < a.kpad / 16; ++i) {
      int sum = 0;
      for (int j = 0; j < 16; ++j) sum += q[16 * i + j];
      s16[i] = (int16_t)sum;
    }
    for (int64_t i = 0; i < a.kpad / 32; ++i) s32[i] = (int16_t)(s16[2 * i] + s16[2 * i + 1]);
    const int64_t r0 = r / V::ROWS * V::ROWS, rows = std::min<int64_t>(V::ROWS, m - r0);
    int8_t* group = a.q.data() + r0 * a.kpad + 4 * (r - r0);
    for (int64_t i = 0; i < a.kpad / 4; ++i) std::memcpy(group + 4 * i * rows, q + 4 * i, 4);
  }
}

// The R activation rows starting at r0 (a group as quantize_rows interleaves them): codes
// (code i of row r at q + R * i + 4 * r, i a multiple of 4), scales and sums.
template <int R>
struct Rows {
  const int8_t* q;
  const float* d[R];
  const int16_t *s16[R], *s32[R];
  Rows(const Activations& a, int64_t r0) : q(a.q.data() + r0 * a.kpad) {
    for (int r = 0; r < R; ++r) {
      d[r] = a.drow(r0 + r);
      s16[r] = a.s16row(r0 + r);
      s32[r] = a.s32row(r0 + r);
    }
  }
  const int8_t* codes(int r, int64_t i) const { return q + R * i + 4 * r; }
};

// part[r] = V::dot over code registers w(first) .. w(first + count - 1) (codes <= MAXCODE,
// count <= min(8, V::run(MAXCODE))) and row r's activations at i, i + 4, ...; each register
// decoded once. ROWS_OUTER: the run's registers decoded first, then each row's chain over
// them; else the rows innermost, each register used by every row where it is decoded. Which
// order GCC compiles better differs by format (AVX2, Zen 3, SEVERAL_ROWS scheduling, 4 rows,
// ms rows innermost against rows outer: Q4_K 0.72 / 0.81, Q4_0 0.99 / 0.92, Q5_0 1.20 /
// 1.10; Q6_K the same within noise). The loops over code registers here and in the
// callers are unrolled by pragma, so the decoders' shifts and offsets are constants: GCC 12
// left Q5_0's runs rolled on AVX2 (shift counts and addresses computed per register), which
// halved its one-row speed.
template <class V, int R, bool ROWS_OUTER, class Decode>
ALWAYS_INLINE void dots(typename V::Part* part, Decode w, int first, int count, const Rows<R>& x, int64_t i) {
  if constexpr (ROWS_OUTER) {
    typename V::Bytes we[8];
#pragma GCC unroll 8
    for (int e = 0; e < count; ++e) we[e] = w(first + e);
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int e = 0; e < count; ++e) part[r] = V::dot(part[r], we[e], x.codes(r, i + 4 * (first + e)));
  } else {
#pragma GCC unroll 8
    for (int e = first; e < first + count; ++e) {
      const typename V::Bytes we = w(e);
      for (int r = 0; r < R; ++r) part[r] = V::dot(part[r], we, x.codes(r, i + 4 * e));
    }
  }
}

// sums[r] += scale * (the dot products of code registers w(0) .. w(count - 1), codes <=
// MAXCODE, with row r's activations from i on), in runs as V's int16 sums allow.
template <class V, int R, bool ROWS_OUTER, int MAXCODE, class Decode>
ALWAYS_INLINE void scaled_dots(typename V::Ints* sums, typename V::Scale scale, Decode w, int count, const Rows<R>& x, int64_t i) {
  constexpr int RUN = V::run(MAXCODE);
  static_assert(RUN > 0);
#pragma GCC unroll 8
  for (int e0 = 0; e0 < count; e0 += RUN) {
    typename V::Part part[R];
    for (int r = 0; r < R; ++r) part[r] = V::begin(V::set(0));
    dots<V, R, ROWS_OUTER>(part, w, e0, std::min(RUN, count - e0), x, i);
    for (int r = 0; r < R; ++r) sums[r] = V::end_scaled(sums[r], part[r], scale);
  }
}

// Element i of field `field` of a full tile of QTYPE, from column c0 on (`element`, read only).
template <int QTYPE>
ALWAYS_INLINE const uint8_t* at(const uint8_t* t, int field, int i, int c0) {
  return element(const_cast<uint8_t*>(t), QTYPE, field, i, TILE, c0);
}

// The walk the K-quant kernels share: R rows' float sums over the blocks of one column group,
// `add_block(t, blk, c0, acc, ahead)` adding block blk (its tile at t) of the V::LANES columns
// from c0 to acc[R] in 8 steps (its sub-blocks), calling ahead(step) at each; out[R][TILE].
// Every part of a tile is computed before the next tile, so the weights stream through once.
// The tile PREFETCH bytes on is requested a slice a step: the whole of it at once, ~50
// requests at each tile's start, stalled the loads behind them (one row from memory on 2 Zen 3
// cores: Q6_K 20 -> 29 GB/s, Q4_K 24 -> 28 GB/s spread).
template <class V, int R, int QTYPE, class AddBlock>
ALWAYS_INLINE void walk_blocks(const uint8_t* tiles, int64_t blocks, float* out, AddBlock add_block) {
  constexpr int BYTES = TILE * packed_bytes(QTYPE), PARTS = TILE / V::LANES, STEPS = 8 * PARTS, LINES = (BYTES + 63) / 64;
  typename V::Floats acc[PARTS][R];
  for (int c = 0; c < PARTS; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = V::fzero();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const uint8_t* t = tiles + blk * BYTES;
    for (int c = 0; c < PARTS; ++c) {
      const auto ahead = [&](int step) __attribute__((always_inline)) {
        const int slice = 8 * c + step, first = LINES * slice / STEPS, last = LINES * (slice + 1) / STEPS;
        V::prefetch(t + PREFETCH + 64 * first, 64 * (last - first));
      };
      add_block(t, blk, c * V::LANES, acc[c], ahead);
    }
  }
  for (int c = 0; c < PARTS; ++c)
    for (int r = 0; r < R; ++r) V::store(out + TILE * r + c * V::LANES, acc[c][r]);
}

// Q4_K: per sub-block of 32 weights, scale * (codes . x); the mins through the activations'
// sums of 32.
template <class V, int R>
ALWAYS_INLINE void q4_k_rows(const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  const Rows<R> x(a, r0);
  walk_blocks<V, R, Q4_K>(tiles, blocks, out, [&](const uint8_t* t, int64_t blk, int c0, typename V::Floats* acc, auto ahead) __attribute__((always_inline)) {
    typename V::Ints sums[R];
    for (int r = 0; r < R; ++r) sums[r] = V::set(0);
    for (int s = 0; s < 8; ++s) {  // sub-blocks of 32 weights
      ahead(s);
      const auto codes = [&](int e) __attribute__((always_inline)) { return V::shr_and(V::load(at<Q4_K>(t, Q4_QS, 4 * s + e / 2, c0)), 4 * (e % 2), 0x0f); };
      scaled_dots<V, R, false, 15>(sums, V::scale_u8(at<Q4_K>(t, SC, s, c0)), codes, 8, x, SUPER * blk + 32 * s);
    }
    const typename V::Floats d = V::halves(at<Q4_K>(t, D, 0, c0)), dmin = V::halves(at<Q4_K>(t, DMIN, 0, c0));
    typename V::Ints mins[4];
    for (int j = 0; j < 4; ++j) mins[j] = V::u8_pairs(at<Q4_K>(t, MN, j, c0));
    for (int r = 0; r < R; ++r) {
      typename V::Ints offs = V::set(0);
      for (int j = 0; j < 4; ++j) offs = V::pair_dot(offs, mins[j], x.s32[r] + 8 * blk + 2 * j);
      const typename V::Floats v = V::fnmadd(dmin, V::cvt(offs), V::fmul(d, V::cvt(sums[r])));
      acc[r] = V::fmadd(v, V::fset(x.d[r][blk]), acc[r]);
    }
  });
}

// Bits 2t, 2t+1 of each byte of Q6_K's high-bit element, moved to bits 4, 5.
template <class V>
ALWAYS_INLINE typename V::Bytes q6_high(typename V::Bytes h, int t) {
  return t < 2 ? V::shl_and(h, 4 - 2 * t, 0x30) : V::shr_and(h, 2 * t - 4, 0x30);
}

// Q6_K: per sub-block of 16 weights, scale * (codes . x), codes being q + 32; the 32 * scale
// offsets through the activations' sums of 16.
template <class V, int R>
ALWAYS_INLINE void q6_k_rows(const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  const Rows<R> x(a, r0);
  walk_blocks<V, R, Q6_K>(tiles, blocks, out, [&](const uint8_t* t, int64_t blk, int c0, typename V::Floats* acc, auto ahead) __attribute__((always_inline)) {
    typename V::Ints sums[R];
    for (int r = 0; r < R; ++r) sums[r] = V::set(0);
    for (int j = 0; j < 8; ++j) {  // pairs of sub-blocks of 16 weights
      ahead(j);
      const typename V::Ints scales = V::i8_pairs(at<Q6_K>(t, Q6_SC, j, c0));
      for (int h = 0; h < 2; ++h) {  // sub-block 2j + h: elements 2h, 2h + 1 of low nibbles
        const auto codes = [&](int e) __attribute__((always_inline)) {
          const typename V::Bytes low = V::load(at<Q6_K>(t, Q6_QS, 4 * j + 2 * h + e / 2, c0));
          const typename V::Bytes high = V::load(at<Q6_K>(t, Q6_QH, 2 * j + h, c0));
          return V::or_(V::shr_and(low, 4 * (e % 2), 0x0f), q6_high<V>(high, e));
        };
        scaled_dots<V, R, true, 63>(sums, V::scale_half(scales, h), codes, 4, x, SUPER * blk + 32 * j + 16 * h);
      }
    }
    typename V::Ints offs[R];  // after the codes: their registers would not fit beside them
    for (int r = 0; r < R; ++r) offs[r] = V::set(0);
    for (int j = 0; j < 8; ++j) {
      const typename V::Ints scales = V::i8_pairs(at<Q6_K>(t, Q6_SC, j, c0));
      for (int r = 0; r < R; ++r) offs[r] = V::pair_dot(offs[r], scales, x.s16[r] + 16 * blk + 2 * j);
    }
    for (int r = 0; r < R; ++r) sums[r] = V::sub(sums[r], V::shl(offs[r], 5));
    const typename V::Floats d = V::halves(at<Q6_K>(t, D, 0, c0));
    for (int r = 0; r < R; ++r) acc[r] = V::fmadd(V::fmul(d, V::cvt(sums[r])), V::fset(x.d[r][blk]), acc[r]);
  });
}

// Q8_0, Q5_0 and Q4_0: blocks of 32 weights, each with its own scale; the activations' scale
// applies once per 8 blocks.
template <class V, int R, int QTYPE>
ALWAYS_INLINE void q32_rows(const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  constexpr int BYTES = TILE * packed_bytes(QTYPE), OFFSET = QTYPE == Q8_0 ? 128 : QTYPE == Q5_0 ? 16 : 8, PARTS = TILE / V::LANES;
  const Rows<R> x(a, r0);
  typename V::Floats acc[PARTS][R], group[PARTS][R];
  for (int c = 0; c < PARTS; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = V::fzero();
  for (int64_t g = 0; g * 8 < blocks; ++g) {
    for (int c = 0; c < PARTS; ++c)
      for (int r = 0; r < R; ++r) group[c][r] = V::fzero();
    for (int64_t blk = 8 * g; blk < std::min<int64_t>(blocks, 8 * g + 8); ++blk) {
      const uint8_t* t = tiles + blk * BYTES;
      V::prefetch(t + PREFETCH, BYTES);
      for (int c = 0; c < PARTS; ++c) {  // the lanes from column c0
        const int c0 = c * V::LANES;
        const auto codes = [&](int e) __attribute__((always_inline)) {
          if constexpr (QTYPE == Q8_0) {
            return V::load(at<Q8_0>(t, Q8_QS, e, c0));
          } else if constexpr (QTYPE == Q4_0) {
            return V::shr_and(V::load(at<Q4_0>(t, Q40_QS, e / 2, c0)), 4 * (e % 2), 0x0f);
          } else {
            const typename V::Bytes low = V::shr_and(V::load(at<Q5_0>(t, Q5_QS, e / 2, c0)), 4 * (e % 2), 0x0f);
            const typename V::Bytes high = V::load(at<Q5_0>(t, Q5_QH, 0, c0));  // bit e of each byte -> bit 4
            return V::or_(low, e <= 4 ? V::shl_and(high, 4 - e, 0x10) : V::shr_and(high, e - 4, 0x10));
          }
        };
        typename V::Ints dot[R];
        for (int r = 0; r < R; ++r) dot[r] = V::set(-OFFSET * x.s32[r][blk]);
        if constexpr (QTYPE == Q8_0) {
          for (int e = 0; e < 8; ++e) {
            const typename V::Bytes we = codes(e);
            for (int r = 0; r < R; ++r) dot[r] = V::wide_dot(dot[r], we, x.codes(r, 32 * blk + 4 * e));
          }
        } else {
          constexpr int RUN = V::run(QTYPE == Q5_0 ? 31 : 15);
#pragma GCC unroll 8
          for (int e0 = 0; e0 < 8; e0 += RUN) {
            typename V::Part part[R];
            for (int r = 0; r < R; ++r) part[r] = V::begin(dot[r]);
            dots<V, R, true>(part, codes, e0, std::min(RUN, 8 - e0), x, 32 * blk);
            for (int r = 0; r < R; ++r) dot[r] = V::end(dot[r], part[r]);
          }
        }
        const typename V::Floats d = V::halves(at<QTYPE>(t, D, 0, c0));
        for (int r = 0; r < R; ++r) group[c][r] = V::fmadd(V::cvt(dot[r]), d, group[c][r]);
      }
    }
    for (int c = 0; c < PARTS; ++c)
      for (int r = 0; r < R; ++r) acc[c][r] = V::fmadd(group[c][r], V::fset(x.d[r][g]), acc[c][r]);
  }
  for (int c = 0; c < PARTS; ++c)
    for (int r = 0; r < R; ++r) V::store(out + TILE * r + c * V::LANES, acc[c][r]);
}

// R rows (1 <= R <= V::ROWS) of one column group: out[R][TILE].
template <class V, int R>
ALWAYS_INLINE void kernel_rows(int qtype, const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  switch (qtype) {
    case Q4_K: return q4_k_rows<V, R>(tiles, blocks, a, r0, out);
    case Q6_K: return q6_k_rows<V, R>(tiles, blocks, a, r0, out);
    case Q8_0: return q32_rows<V, R, Q8_0>(tiles, blocks, a, r0, out);
    case Q5_0: return q32_rows<V, R, Q5_0>(tiles, blocks, a, r0, out);
    default: return q32_rows<V, R, Q4_0>(tiles, blocks, a, r0, out);
  }
}

// One row streams the weights from memory: compiled with the default options, whose schedule
// keeps the tile's requests spread (qmatmul.cpp's SEVERAL_ROWS costs Q4_K 25% from memory).
template <class V>
void one_row(int qtype, const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  kernel_rows<V, 1>(qtype, tiles, blocks, a, r0, out);
}

// 2 <= rows <= V::ROWS: compute-bound, compiled with the includer's SEVERAL_ROWS options.
#ifndef SEVERAL_ROWS
#define SEVERAL_ROWS
#endif
template <class V, int R = V::ROWS>
SEVERAL_ROWS void several_rows(int qtype, int rows, const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  if constexpr (R > 2) {
    if (rows < R) return several_rows<V, R - 1>(qtype, rows, tiles, blocks, a, r0, out);
  }
  kernel_rows<V, R>(qtype, tiles, blocks, a, r0, out);
}
#undef SEVERAL_ROWS

template <class V>
void columns(const Job& job, int64_t g0, int64_t g1) {
  const Activations& a = *job.a;
  const int qtype = job.qtype;
  const int64_t blocks = a.k / FORMATS[qtype].block;
  alignas(64) float out[V::ROWS * TILE];
  std::vector<uint8_t> widened;
  for (int64_t g = g0; g < g1; ++g) {
    int width;
    const uint8_t* tiles = tile_at(qtype, job.w, job.n, a.k, g, 0, width);
    if (width < TILE) {  // the last, narrower group: zero columns make it a full tile
      widened.assign(blocks * tile_bytes(qtype, TILE), 0);
      Block b;
      for (int64_t blk = 0; blk < blocks; ++blk)
        for (int c = 0; c < width; ++c) {
          b = Block();
          read_tile(qtype, tiles + blk * tile_bytes(qtype, width), width, c, b);
          write_tile(qtype, b, widened.data() + blk * tile_bytes(qtype, TILE), TILE, c);
        }
      tiles = widened.data();
    }
    for (int64_t r0 = 0; r0 < a.m; r0 += V::ROWS) {
      const int rows = (int)std::min<int64_t>(V::ROWS, a.m - r0);
      if (rows == 1)
        one_row<V>(qtype, tiles, blocks, a, r0, out);
      else
        several_rows<V>(qtype, rows, tiles, blocks, a, r0, out);
      for (int r = 0; r < rows; ++r) std::memcpy(job.y + (r0 + r) * job.ldy + g * TILE, out + TILE * r, sizeof(float) * width);
    }
  }
}

