// The matmul kernels over 16 lanes, one per column of a tile: included by qmatmul.cpp once
// per instruction set, inside a namespace compiled for it, with the names it defines
// (Activations, Job, FORMATS, ...) in scope. Not a standalone header.
//
// A `Lanes` struct supplies: Bytes (64 bytes: 4 per lane), Ints (16 int32), Floats (16
// float), ROWS (rows a decoded tile serves at once: what fits the register file) and:
//   load(p)                 64 bytes
//   shr_and(v, s, m)        each byte (b >> s) & m; shl_and likewise with <<
//   or_(a, b)
//   dot(acc, w, x)          acc + per lane sum of its 4 unsigned bytes of w times x[0..3]
//                           (int8), for codes < 128; wide_dot for any unsigned codes
//   pair_dot(acc, v, p)     acc + per lane low16(v) * p[0] + high16(v) * p[1] (int16)
//   u8(p), u8_pairs(p), i8_pairs(p)   16 bytes as int32 lanes; 32 bytes as int16 pairs
//   low16(v), high16(v)     the int16 halves of each lane, sign-extended
//   add, sub, mul (int32), shl(v, s), set(int)
//   halves(p)               16 fp16 as floats; cvt(Ints); fmul, fmadd(a, b, c) = a*b + c
//                           (one rounding), fnmadd(a, b, c) = c - a*b (one rounding)
//   fset(float), fzero(), store(p, v), prefetch(p, bytes)

// Each row of x quantized on its own (see qmatmul.cpp's header): codes, scales, sums. Plain
// loops over 16 lanes of integer or correctly rounded IEEE operations, nothing reassociated,
// so each instruction set's vectorization of them gives the portable path's bits. Rounding
// to nearest even adds and subtracts 1.5 * 2^23 (the values are within +-127.5).
inline void quantize_rows(const float* x, int64_t m, int64_t k, Activations& a) {
  constexpr float ROUND = 12582912.f;
  a.m = m;
  a.k = k;
  a.groups = (k + SUPER - 1) / SUPER;
  a.kpad = a.groups * SUPER;
  a.q.assign(m * a.kpad, 0);
  a.d.assign(m * a.groups, 0.f);
  a.s16.resize(m * (a.kpad / 16));
  a.s32.resize(m * (a.kpad / 32));
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    int8_t* q = a.q.data() + r * a.kpad;
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
  }
}

// The R activation rows starting at r0: pointers to their codes, scales and sums.
template <int R>
struct Rows {
  const int8_t* q[R];
  const float* d[R];
  const int16_t *s16[R], *s32[R];
  Rows(const Activations& a, int64_t r0) {
    for (int r = 0; r < R; ++r) {
      q[r] = a.qrow(r0 + r);
      d[r] = a.drow(r0 + r);
      s16[r] = a.s16row(r0 + r);
      s32[r] = a.s32row(r0 + r);
    }
  }
};

// dot[r] += the 8 code registers w times row r's 32 activations at x[r] + at: the rows
// innermost, so R independent chains of dot products overlap.
template <class V, int R>
void dot_rows(typename V::Ints* dot, const typename V::Bytes* w, int first, int count, const Rows<R>& x, int64_t at, bool wide = false) {
  for (int e = first; e < first + count; ++e)
    for (int r = 0; r < R; ++r) dot[r] = wide ? V::wide_dot(dot[r], w[e], x.q[r] + at + 4 * e) : V::dot(dot[r], w[e], x.q[r] + at + 4 * e);
}

// The walk the K-quant kernels share: R rows' float sums over the blocks of one column group,
// `add_block(t, blk, acc)` adding block blk (its tile at t) to them; out[R][TILE].
template <class V, int R, int QTYPE, class AddBlock>
void walk_blocks(const uint8_t* tiles, int64_t blocks, float* out, AddBlock add_block) {
  constexpr int BYTES = TILE * packed_bytes(QTYPE);
  typename V::Floats acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V::fzero();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const uint8_t* t = tiles + blk * BYTES;
    V::prefetch(t + PREFETCH, BYTES);
    add_block(t, blk, acc);
  }
  for (int r = 0; r < R; ++r) V::store(out + TILE * r, acc[r]);
}

template <class V, int R>
void q4_k_rows(const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  const Rows<R> x(a, r0);
  walk_blocks<V, R, Q4_K>(tiles, blocks, out, [&](const uint8_t* t, int64_t blk, typename V::Floats* acc) {
    typename V::Ints sums[R], dot[R];
    for (int r = 0; r < R; ++r) sums[r] = V::set(0);
    for (int s = 0; s < 8; ++s) {  // sub-blocks of 32 weights
      const typename V::Ints scale = V::u8(t + TILE * field_offset(Q4_K, SC) + TILE * s);
      typename V::Bytes w[8];
      for (int e = 0; e < 4; ++e) {
        const typename V::Bytes v = V::load(t + TILE * field_offset(Q4_K, Q4_QS) + 64 * (4 * s + e));
        w[2 * e] = V::shr_and(v, 0, 0x0f);
        w[2 * e + 1] = V::shr_and(v, 4, 0x0f);
      }
      for (int r = 0; r < R; ++r) dot[r] = V::set(0);
      dot_rows<V, R>(dot, w, 0, 8, x, SUPER * blk + 32 * s);
      for (int r = 0; r < R; ++r) sums[r] = V::add(sums[r], V::mul(dot[r], scale));
    }
    const typename V::Floats d = V::halves(t + TILE * field_offset(Q4_K, D)), dmin = V::halves(t + TILE * field_offset(Q4_K, DMIN));
    typename V::Ints mins[4];
    for (int j = 0; j < 4; ++j) mins[j] = V::u8_pairs(t + TILE * field_offset(Q4_K, MN) + 2 * TILE * j);
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
typename V::Bytes q6_high(typename V::Bytes h, int t) {
  return t < 2 ? V::shl_and(h, 4 - 2 * t, 0x30) : V::shr_and(h, 2 * t - 4, 0x30);
}

template <class V, int R>
void q6_k_rows(const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  const Rows<R> x(a, r0);
  walk_blocks<V, R, Q6_K>(tiles, blocks, out, [&](const uint8_t* t, int64_t blk, typename V::Floats* acc) {
    typename V::Ints sums[R], dot0[R], dot1[R];
    for (int r = 0; r < R; ++r) sums[r] = V::set(0);
    for (int j = 0; j < 8; ++j) {  // pairs of sub-blocks of 16 weights
      const typename V::Ints scales = V::i8_pairs(t + TILE * field_offset(Q6_K, Q6_SC) + 2 * TILE * j);
      typename V::Bytes w[8];
      for (int h = 0; h < 2; ++h) {
        const typename V::Bytes high = V::load(t + TILE * field_offset(Q6_K, Q6_QH) + 64 * (2 * j + h));
        for (int e = 0; e < 2; ++e) {
          const typename V::Bytes v = V::load(t + TILE * field_offset(Q6_K, Q6_QS) + 64 * (4 * j + 2 * h + e));
          w[4 * h + 2 * e] = V::or_(V::shr_and(v, 0, 0x0f), q6_high<V>(high, 2 * e));
          w[4 * h + 2 * e + 1] = V::or_(V::shr_and(v, 4, 0x0f), q6_high<V>(high, 2 * e + 1));
        }
      }
      for (int r = 0; r < R; ++r) {  // codes are q + 32
        const int16_t* xs = x.s16[r] + 16 * blk + 2 * j;
        dot0[r] = V::set(-32 * xs[0]);
        dot1[r] = V::set(-32 * xs[1]);
      }
      dot_rows<V, R>(dot0, w, 0, 4, x, SUPER * blk + 32 * j);
      dot_rows<V, R>(dot1, w, 4, 4, x, SUPER * blk + 32 * j);
      const typename V::Ints scale0 = V::low16(scales), scale1 = V::high16(scales);
      for (int r = 0; r < R; ++r) sums[r] = V::add(sums[r], V::add(V::mul(dot0[r], scale0), V::mul(dot1[r], scale1)));
    }
    const typename V::Floats d = V::halves(t + TILE * field_offset(Q6_K, D));
    for (int r = 0; r < R; ++r) acc[r] = V::fmadd(V::fmul(d, V::cvt(sums[r])), V::fset(x.d[r][blk]), acc[r]);
  });
}

// Q8_0, Q5_0 and Q4_0: blocks of 32 weights, each with its own scale; the activations' scale
// applies once per 8 blocks.
template <class V, int R, int QTYPE>
void q32_rows(const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  constexpr int BYTES = TILE * packed_bytes(QTYPE), OFFSET = QTYPE == Q8_0 ? 128 : QTYPE == Q5_0 ? 16 : 8;
  const Rows<R> x(a, r0);
  typename V::Floats acc[R], group[R];
  typename V::Ints dot[R];
  for (int r = 0; r < R; ++r) acc[r] = V::fzero();
  for (int64_t g = 0; g * 8 < blocks; ++g) {
    for (int r = 0; r < R; ++r) group[r] = V::fzero();
    for (int64_t blk = 8 * g; blk < std::min<int64_t>(blocks, 8 * g + 8); ++blk) {
      const uint8_t* t = tiles + blk * BYTES;
      V::prefetch(t + PREFETCH, BYTES);
      typename V::Bytes w[8];
      if (QTYPE == Q8_0) {
        for (int e = 0; e < 8; ++e) w[e] = V::load(t + TILE * field_offset(Q8_0, Q8_QS) + 64 * e);
      } else if (QTYPE == Q4_0) {
        for (int i = 0; i < 4; ++i) {
          const typename V::Bytes v = V::load(t + TILE * field_offset(Q4_0, Q40_QS) + 64 * i);
          w[2 * i] = V::shr_and(v, 0, 0x0f);
          w[2 * i + 1] = V::shr_and(v, 4, 0x0f);
        }
      } else {
        const typename V::Bytes high = V::load(t + TILE * field_offset(Q5_0, Q5_QH));
        for (int i = 0; i < 4; ++i) {
          const typename V::Bytes v = V::load(t + TILE * field_offset(Q5_0, Q5_QS) + 64 * i);
          for (int h = 0; h < 2; ++h) {
            const int bit = 2 * i + h;  // -> bit 4
            const typename V::Bytes fifth = bit <= 4 ? V::shl_and(high, 4 - bit, 0x10) : V::shr_and(high, bit - 4, 0x10);
            w[bit] = V::or_(V::shr_and(v, 4 * h, 0x0f), fifth);
          }
        }
      }
      for (int r = 0; r < R; ++r) dot[r] = V::set(-OFFSET * x.s32[r][blk]);
      dot_rows<V, R>(dot, w, 0, 8, x, 32 * blk, QTYPE == Q8_0);
      const typename V::Floats d = V::halves(t + TILE * field_offset(QTYPE, D));
      for (int r = 0; r < R; ++r) group[r] = V::fmadd(V::cvt(dot[r]), d, group[r]);
    }
    for (int r = 0; r < R; ++r) acc[r] = V::fmadd(group[r], V::fset(x.d[r][g]), acc[r]);
  }
  for (int r = 0; r < R; ++r) V::store(out + TILE * r, acc[r]);
}

// R rows (1 <= R <= V::ROWS) of one column group: out[R][TILE].
template <class V, int R = V::ROWS>
void group_rows(int qtype, int rows, const uint8_t* tiles, int64_t blocks, const Activations& a, int64_t r0, float* out) {
  if constexpr (R > 1) {
    if (rows < R) return group_rows<V, R - 1>(qtype, rows, tiles, blocks, a, r0, out);
  }
  switch (qtype) {
    case Q4_K: return q4_k_rows<V, R>(tiles, blocks, a, r0, out);
    case Q6_K: return q6_k_rows<V, R>(tiles, blocks, a, r0, out);
    case Q8_0: return q32_rows<V, R, Q8_0>(tiles, blocks, a, r0, out);
    case Q5_0: return q32_rows<V, R, Q5_0>(tiles, blocks, a, r0, out);
    default: return q32_rows<V, R, Q4_0>(tiles, blocks, a, r0, out);
  }
}

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
      group_rows<V>(qtype, rows, tiles, blocks, a, r0, out);
      for (int r = 0; r < rows; ++r) std::memcpy(job.y + (r0 + r) * job.ldy + g * TILE, out + TILE * r, sizeof(float) * width);
    }
  }
}

