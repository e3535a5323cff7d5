// Attention over a KV cache, and the SwiGLU gate that shares its exp: included by qmatmul.cpp
// once per instruction set, inside the namespace compiled for it (like tiles.h; not a
// standalone header).
//
// The cache keeps keys transposed (a layer's keys: [kv_heads, dim, capacity]), values as
// rows ([kv_heads, capacity, dim]). Each (row, head) is computed on its own, in float32, in
// one fixed order of operations: a slot's score sums its dim products in order of dim (64
// consecutive slots side by side, one vector operation per dim), the softmax runs over the
// slots the row may attend to, counted from the first of them (never by slot number), its
// sum as 16 lane sums reduced pairwise, and the weighted values are added slot by slot.
// Only multiplies, adds, divides and comparisons, each correctly rounded and none
// reassociated or fused (the library is built with -ffp-contract=off), so a row's output
// is the same bits whatever the other rows of the pass, the thread, the instruction set and
// where in the cache the slots it attends to lie: a token tree's verification sees exactly
// what one-token decoding sees once the accepted path is committed.

constexpr int LANES = 16;
constexpr int SLOTS = 64;  // slots scored at once
constexpr int CHUNK = 64;  // value dimensions accumulated at once

// Sum of 16 lanes, pairwise in a fixed order.
inline float reduce_lanes(float* lanes) {
  for (int l = 0; l < 8; ++l) lanes[l] += lanes[l + 8];
  for (int l = 0; l < 4; ++l) lanes[l] += lanes[l + 4];
  for (int l = 0; l < 2; ++l) lanes[l] += lanes[l + 2];
  return lanes[0] + lanes[1];
}

// e^x for -87 <= x <= 0: 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 in two steps,
// e^r by Cephes' expf polynomial.
inline float exp_nonpositive(float x) {
  constexpr float ROUND = 12582912.f, LOG2E = 1.44269504088896341f, C1 = 0.693359375f, C2 = -2.12194440e-4f;
  const float n = (x * LOG2E + ROUND) - ROUND;
  const float r = (x - n * C1) - n * C2;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// scores[width] = q . key of `width` (<= SLOTS) consecutive slots of transposed keys (row d of
// the keys at keys + d * capacity), each summed in order of d.
template <int WIDTH>
inline void score_slots(const float* __restrict q, const float* __restrict keys, int64_t dim, int64_t capacity, float* __restrict scores,
                        int width = WIDTH) {
  float s[SLOTS] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float qd = q[d], *row = keys + d * capacity;
    for (int l = 0; l < (WIDTH ? WIDTH : width); ++l) s[l] += qd * row[l];
  }
  for (int l = 0; l < (WIDTH ? WIDTH : width); ++l) scores[l] = s[l];
}

// Per-thread scratch: every slot's score, then the allowed slots and their weights.
struct Scratch {
  std::vector<float> all, weights;
  std::vector<int64_t> slots;
};

// out[dim] = attention of one query row of one head over the cache slots its mask allows.
inline void attend_row(const AttentionJob& job, const float* __restrict q, const float* __restrict keys, const float* __restrict v,
                       const uint8_t* __restrict mask, Scratch& scratch, float* __restrict out) {
  const int64_t dim = job.dim, capacity = job.capacity;
  float* __restrict all = scratch.all.data();
  int64_t j = 0;
  for (; j + SLOTS <= job.slots; j += SLOTS) score_slots<SLOTS>(q, keys + j, dim, capacity, all + j);
  if (j < job.slots) score_slots<0>(q, keys + j, dim, capacity, all + j, (int)(job.slots - j));
  float* __restrict weights = scratch.weights.data();
  int64_t count = 0;
  float tops[LANES];
  for (int l = 0; l < LANES; ++l) tops[l] = -INFINITY;
  for (j = 0; j < job.slots; ++j) {
    if (mask && !mask[j]) continue;
    float s = all[j] * job.scale;
    if (job.softcap > 0.f) s = std::tanh(s / job.softcap) * job.softcap;
    tops[count % LANES] = std::max(tops[count % LANES], s);
    scratch.slots[count] = j;
    weights[count++] = s;
  }
  float top = -INFINITY;
  for (int l = 0; l < LANES; ++l) top = std::max(top, tops[l]);
  int64_t i = 0;
  for (; i < count; ++i) weights[i] = exp_nonpositive(std::max(weights[i] - top, -87.f));
  float sums[LANES] = {};
  for (i = 0; i + LANES <= count; i += LANES)
    for (int l = 0; l < LANES; ++l) sums[l] += weights[i + l];
  for (int l = 0; i < count; ++i, ++l) sums[l] += weights[i];
  const float total = reduce_lanes(sums);
  for (int64_t d0 = 0; d0 < dim; d0 += CHUNK) {
    const int64_t width = std::min<int64_t>(CHUNK, dim - d0);
    float acc[CHUNK] = {};
    for (i = 0; i < count; ++i) {
      const float p = weights[i], *value = v + scratch.slots[i] * dim + d0;
      if (width == CHUNK) {  // a constant trip count: unrolled
        for (int d = 0; d < CHUNK; ++d) acc[d] += p * value[d];
      } else {
        for (int d = 0; d < width; ++d) acc[d] += p * value[d];
      }
    }
    for (int d = 0; d < width; ++d) out[d0 + d] = acc[d] / total;
  }
}

// Items [i0, i1) of the job: item = row * heads + head.
inline void attend_items(const AttentionJob& job, int64_t i0, int64_t i1) {
  static thread_local Scratch scratch;
  scratch.all.resize(job.slots);
  scratch.weights.resize(job.slots);
  scratch.slots.resize(job.slots);
  const int64_t group = job.heads / job.kv_heads, head_floats = job.capacity * job.dim;
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t row = item / job.heads, head = item % job.heads, kv = head / group;
    attend_row(job, job.q + item * job.dim, job.k + kv * head_floats, job.v + kv * head_floats,
               job.mask ? job.mask + row * job.slots : nullptr, scratch, job.out + item * job.dim);
  }
}

// act[i] = silu(gate[i]) * up[i] for i < n, silu(g) = g / (1 + e^-g) computed as g * e^g /
// (1 + e^g) below zero, so the exponent is never positive: one vectorized loop of correctly
// rounded operations, the same bits on every instruction set. The C library's expf, a call
// per value, had cost 0.29 ms of each 8-row layer's 8960-wide gate (Zen 3); whole resident
// passes of the target at 8 / 16 rows went from 134 / 264 to 127 / 237 ms with this and
// attention's exp vectorized (-fno-trapping-math, setup.py).
inline void gate(const float* __restrict gate, const float* __restrict up, int64_t n, float* __restrict act) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i], e = exp_nonpositive(std::max(-std::fabs(g), -87.f));
    act[i] = std::max(g, g * e) / (1.f + e) * up[i];  // g at or above zero, g * e below
  }
}
