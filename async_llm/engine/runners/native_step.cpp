// The fast runner's layers in one native call (see native.py): the products FastDecoder._layers runs
// for a step (decode rows over the padded batch, a verify step's rows, prompt chunks each over its own
// buffer, or rows and chunks together; the same ATen and oneDNN calls, but for the int8 products of
// a few rows below), and between them a handful of compact kernels where Python ran some thirty small
// operations a layer: the residual addition with the next RMSNorm, rotary, attention (writing the
// step's keys and values into the buffers, then a float32 softmax over each query's live columns:
// the decode rows a key/value head at a time, each key and value read once for its group of query
// heads, with AVX-512 where the CPU has it; short prompt chunks all in parallel in a kernel of their
// own, long ones through ATen's fused attention, as the Python layers run them), SiLU-and-multiply,
// the int8 rows' quantization and scaling back, and with AVX512-VNNI the int8 products of one to four
// rows. Loops run on torch's OpenMP threads (at::parallel_for). Each rounds where the Python
// operations round (to the model's dtype after each of them); sums run in another order, so results
// agree up to float32 reassociation (tested against the Python layers and generate).
//
// Why kernels of our own and not ATen's: a product streams megabytes of weights through the caches,
// and the next operation's code and data come back from memory: measured on the machines here, a
// first small ATen operation after a large product costs tens of microseconds (a composite one such
// as rms_norm about 60), several times its own cost. A few small kernels keep that price small.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Scalars = c10::List<std::optional<at::Scalar>>;

// Product kinds (native.py's spec): a plain linear over one or several weights (outputs
// concatenated), oneDNN's prepacked float linear (with the plain weights for one row), oneDNN int8.
constexpr int64_t PLAIN = 0;
constexpr int64_t PACKED = 1;
constexpr int64_t INT8 = 2;
// A prompt chunk of at most this many query-column pairs (its tokens times the columns its last
// token sees) attends in chunk_attention_kernel, in parallel with the step's other small chunks: a
// call of ATen's fused attention costs some 150 us a chunk and layer for a prompt of a dozen tokens.
// Longer chunks go through that kernel, whose blocked products are built for them.
constexpr int64_t SMALL_CHUNK = 64 * 64;
#if defined(__AVX512F__)
constexpr bool VECTOR_KERNELS = true;
#else
constexpr bool VECTOR_KERNELS = false;
#endif
// The widest attention head the AVX-512 loops take (wider ones take the plain loops).
constexpr int64_t MAX_HEAD_DIM = 256;

Tensor linear_pointwise(const Tensor& x, const Tensor& w, const OptTensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, Scalars,
                                     std::optional<c10::string_view>)>();
  return op.call(x, w, b, "none", Scalars(), std::nullopt);
}

Tensor qlinear_pointwise(const Tensor& q, const Tensor& w, const Tensor& scale, const Tensor& zero_points,
                         at::ScalarType out_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("onednn::qlinear_pointwise", "")
                       .typed<Tensor(Tensor, double, int64_t, Tensor, Tensor, Tensor, OptTensor, double, int64_t,
                                     std::optional<at::ScalarType>, c10::string_view, Scalars, c10::string_view)>();
  return op.call(q, 1.0, 0, w, scale, zero_points, std::nullopt, 1.0, 0, out_dtype, "none", Scalars(), "");
}

// Element conversions the compiler vectorizes: float is itself; bfloat16 is the top half of a
// float's bits, and a float rounds to it to nearest even (as torch rounds; NaN aside, which no step
// produces).
inline float as_float(float v) { return v; }
inline float as_float(c10::BFloat16 v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16); }

template <typename T>
T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  uint32_t bits = __builtin_bit_cast(uint32_t, v);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

#if defined(__AVX512F__)
// Sixteen values as float32, with AVX-512 (the CPU has it: the library is built for its own CPU).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

// Rows of `x` [N, K] (float32 or bfloat16), times `inverse` [K] float32 when given, as int8
// symmetric per row, as fast_linear.quantize_rows computes them: the row's largest magnitude m
// (at least float32's tiny), q = round-half-even(x * ((1 / m) * 127)), scale = m / 127.
template <typename T>
void quantize_rows_kernel(const Tensor& x, const float* inverse, Tensor& q, Tensor& scale) {
  const int64_t n = x.size(0), k = x.size(1);
  const T* src = x.data_ptr<T>();
  int8_t* dst = q.data_ptr<int8_t>();
  float* scales = scale.data_ptr<float>();
  const float tiny = std::numeric_limits<float>::min();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = src + r * k;
      float m = 0.0f;
      if (inverse != nullptr) {
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < k; ++j) m = std::max(m, std::fabs(as_float(row[j]) * inverse[j]));
      } else {
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < k; ++j) m = std::max(m, std::fabs(as_float(row[j])));
      }
      m = std::max(m, tiny);
      const float factor = (1.0f / m) * 127.0f;  // `127.0 / amax` in Python: amax.reciprocal() * 127
      int8_t* out = dst + r * k;
      if (inverse != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) out[j] = static_cast<int8_t>(std::nearbyint((as_float(row[j]) * inverse[j]) * factor));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) out[j] = static_cast<int8_t>(std::nearbyint(as_float(row[j]) * factor));
      }
      scales[r] = m / 127.0f;
    }
  });
}

// out[r, :] *= scale[r], then += bias, each rounded to out's dtype as two in-place ATen operations
// would round it.
template <typename T>
void scale_rows_kernel(Tensor& out, const Tensor& scale, const OptTensor& bias) {
  const int64_t n = out.size(0), k = out.size(1);
  T* data = out.data_ptr<T>();
  const float* scales = scale.data_ptr<float>();
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = data + r * k;
      const float s = scales[r];
      if (b != nullptr) {
        for (int64_t j = 0; j < k; ++j) row[j] = from_float<T>(as_float(from_float<T>(as_float(row[j]) * s)) + as_float(b[j]));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) row[j] = from_float<T>(as_float(row[j]) * s);
      }
    }
  });
}

// qk [N, H, D] rotated in place by cos, sin [N, D] as `qk * cos + rotate_half(qk) * sin` computes
// it: each product rounded to the dtype, then their sum.
template <typename T>
void rotary_kernel(Tensor& qk, const Tensor& cos, const Tensor& sin) {
  const int64_t n = qk.size(0), heads = qk.size(1), d = qk.size(2), half = d / 2;
  const int64_t row_stride = qk.stride(0), head_stride = qk.stride(1);
  T* data = qk.data_ptr<T>();
  const T* c = cos.data_ptr<T>();
  const T* s = sin.data_ptr<T>();
  const int64_t cs_stride = cos.stride(0);
  TORCH_CHECK(d <= 1024 && qk.stride(2) == 1 && cos.stride(-1) == 1 && sin.stride(0) == cs_stride,
              "rotary: unexpected layout");
  at::parallel_for(0, n * heads, 16, [&](int64_t begin, int64_t end) {
    float a[1024];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / heads, h = i % heads;
      T* v = data + r * row_stride + h * head_stride;
      const T* cr = c + r * cs_stride;
      const T* sr = s + r * cs_stride;
      for (int64_t j = 0; j < d; ++j) a[j] = as_float(v[j]);
      for (int64_t j = 0; j < d; ++j) {
        const float rotated = j < half ? -a[j + half] : a[j - half];
        const float x = as_float(from_float<T>(a[j] * as_float(cr[j])));
        const float y = as_float(from_float<T>(rotated * as_float(sr[j])));
        v[j] = from_float<T>(x + y);
      }
    }
  });
}


// exp(x) in float32 to about 2 ulp, branch-free so loops over it vectorize: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by its Taylor-like minimax polynomial (Cephes' expf coefficients), times
// 2^n built in the exponent bits. Below -87.3 (a masked column's -inf included) it is 0.
inline float exp_approx(float x) {
  const float clamped = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  return x < -87.3f ? 0.0f : y * scale;
}

#if defined(__AVX512F__)
// from_float and as_float(from_float(.)) on sixteen values: the same rounding, bit for bit.
inline __m512i bfloat16_rounded_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
}
template <typename T>
inline __m512 round16(__m512 v);
template <>
inline __m512 round16<float>(__m512 v) {
  return v;
}
template <>
inline __m512 round16<c10::BFloat16>(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(bfloat16_rounded_bits(v), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  const __m512i high = _mm512_srli_epi32(bfloat16_rounded_bits(v), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(high));
}

// exp_approx on sixteen values, operation for operation (the same results).
inline __m512 exp16(__m512 x) {
  const __m512 clamped = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(clamped, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
  const __m512i exponent = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 result = _mm512_mul_ps(y, _mm512_castsi512_ps(exponent));
  const __mmask16 below = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(below, result, _mm512_setzero_ps());
}
#endif

// x [N, E] += delta (when given; each sum rounded to x's dtype), then out = RMSNorm(x) * weight as
// transformers computes it: in float32, x * rsqrt(mean(x^2) + eps) rounded to the dtype, times the
// weight, rounded.
template <typename T>
void add_rms_norm_kernel(Tensor& x, const Tensor* delta, const Tensor& weight, double eps, Tensor& out) {
  const int64_t n = x.size(0), e = x.size(1);
  T* xs = x.data_ptr<T>();
  const T* ds = delta != nullptr ? delta->data_ptr<T>() : nullptr;
  const T* w = weight.data_ptr<T>();
  T* os = out.data_ptr<T>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = xs + r * e;
      float sum = 0.0f;
#if defined(__AVX512F__)
      if (e % 16 == 0) {
        __m512 squares = _mm512_setzero_ps();
        for (int64_t j = 0; j < e; j += 16) {
          __m512 v = load16(row + j);
          if (ds != nullptr) {
            v = round16<T>(_mm512_add_ps(v, load16(ds + r * e + j)));
            store16(row + j, v);
          }
          squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
        }
        sum = _mm512_reduce_add_ps(squares);
      } else
#endif
      if (ds != nullptr) {
        const T* d = ds + r * e;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < e; ++j) {
          const T v = from_float<T>(as_float(row[j]) + as_float(d[j]));
          row[j] = v;
          sum += as_float(v) * as_float(v);
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < e; ++j) sum += as_float(row[j]) * as_float(row[j]);
      }
      const float inverse = 1.0f / std::sqrt(sum / static_cast<float>(e) + epsilon);
      T* o = os + r * e;
#if defined(__AVX512F__)
      if (e % 16 == 0) {
        const __m512 scale = _mm512_set1_ps(inverse);
        for (int64_t j = 0; j < e; j += 16)
          store16(o + j, _mm512_mul_ps(round16<T>(_mm512_mul_ps(load16(row + j), scale)), load16(w + j)));
        continue;
      }
#endif
#pragma omp simd
      for (int64_t j = 0; j < e; ++j) o[j] = from_float<T>(as_float(from_float<T>(as_float(row[j]) * inverse)) * as_float(w[j]));
    }
  });
}

// gate_up [N, 2I] (gate, then up) -> [N, I]: silu(gate) rounded to the dtype, times up, rounded.
template <typename T>
void silu_mul_kernel(const Tensor& gate_up, Tensor& out) {
  const int64_t n = out.size(0), width = out.size(1);
  const T* src = gate_up.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = src + r * 2 * width;
      const T* u = g + width;
      T* o = dst + r * width;
      int64_t j0 = 0;
#if defined(__AVX512F__)
      for (; j0 + 16 <= width; j0 += 16) {
        const __m512 v = load16(g + j0);
        const __m512 one = _mm512_set1_ps(1.0f);
        const __m512 silu = round16<T>(_mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
        store16(o + j0, _mm512_mul_ps(silu, load16(u + j0)));
      }
#endif
#pragma omp simd
      for (int64_t j = j0; j < width; ++j) {
        const float v = as_float(g[j]);
        const float silu = as_float(from_float<T>(v / (1.0f + exp_approx(-v))));
        o[j] = from_float<T>(silu * as_float(u[j]));
      }
    }
  });
}

// Writes the step's keys and values ([B T, Hkv, D] views, T tokens a row, row by row) into `kv`
// (one layer's [2, B_cap, Hkv, L_cap, D] part) at columns `end` to `end + T - 1` of each row.
template <typename T>
void write_kv(const Tensor& keys, const Tensor& values, const Tensor& layer_kv, int64_t end, int64_t tokens) {
  const int64_t n = keys.size(0), kv_heads = keys.size(1), d = keys.size(2);
  TORCH_CHECK(keys.stride(2) == 1 && values.stride(2) == 1 && layer_kv.stride(4) == 1,
              "keys and values: unexpected layout");
  T* cache = layer_kv.data_ptr<T>();
  const T* ks = keys.data_ptr<T>();
  const T* vs = values.data_ptr<T>();
  const int64_t side = layer_kv.stride(0), row_stride = layer_kv.stride(1), head_stride = layer_kv.stride(2),
                column = layer_kv.stride(3);
  at::parallel_for(0, n * kv_heads, 64, [&](int64_t begin, int64_t stop) {
    for (int64_t i = begin; i < stop; ++i) {
      const int64_t token = i / kv_heads, g = i % kv_heads, r = token / tokens, t = token % tokens;
      T* k = cache + r * row_stride + g * head_stride + (end + t) * column;
      std::memcpy(k, ks + token * keys.stride(0) + g * keys.stride(1), d * sizeof(T));
      std::memcpy(k + side, vs + token * values.stride(0) + g * values.stride(1), d * sizeof(T));
    }
  });
}

// Asks for the `bytes` at `p` to be brought into the cache ahead of their use.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}
// Columns of keys or values the attention kernels ask for ahead of their use: a row's keys and
// values are read once a step, from memory, and the cache's own prefetcher stops at each page.
constexpr int64_t PREFETCH_COLUMNS = 8;

// scores[c] = exp(scores[c] - top) for the n scores, in place (a softmax's numerators); returns their sum.
inline float exp_in_place(float* scores, int64_t n, float top) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < n; ++c) {
    const float p = exp_approx(scores[c] - top);
    scores[c] = p;
    total += p;
  }
  return total;
}

// One query's attention, in float32: scores of `query` [D] against `live` keys (column c at
// k + c * column; its value at v + c * column), scaled, plus bias[c * bias_column] when there is a
// bias; softmax; the weighted sum of the values into `o`, rounded to T. `scores` holds `live` floats,
// `acc` D.
template <typename T>
inline void attend_one(const float* query, const T* k, const T* v, int64_t column, int64_t live, const T* bias,
                       int64_t bias_column, float scale, int64_t d, float* scores, float* acc, T* o) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < live; ++c) {
    const T* kc = k + c * column;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < d; ++j) dot += query[j] * as_float(kc[j]);
    const float s = bias != nullptr ? dot * scale + as_float(bias[c * bias_column]) : dot * scale;
    scores[c] = s;
    top = std::max(top, s);
  }
  const float total = exp_in_place(scores, live, top);
  std::fill(acc, acc + d, 0.0f);
  for (int64_t c = 0; c < live; ++c) {
    const float p = scores[c];
    if (p == 0.0f) continue;  // a masked column
    const T* vc = v + c * column;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) acc[j] += p * as_float(vc[j]);
  }
  const float inverse = 1.0f / total;
  for (int64_t j = 0; j < d; ++j) o[j] = from_float<T>(acc[j] * inverse);
}

#if defined(__AVX512F__)
// Lane c of the result: the sum of the sixteen lanes of the c-th of the sixteen vectors at `v`
// (16 x 16 floats), by a transposing tree of 15 additions (where one horizontal sum a vector would
// take 4 additions and as many shuffles each).
inline __m512 lane_sums16(const float* v) {
  __m512 t[8];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = _mm512_loadu_ps(v + 32 * i), b = _mm512_loadu_ps(v + 32 * i + 16);
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  __m512 u[4];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// One row's key/value head in grouped_attention_kernel, for heads of 16 BLOCKS floats: `queries`
// queries (`query`, [queries, D] float32; query j of token j / group) against `width` columns of
// keys `k` and values `v` (`column` apart), prefetched PREFETCH_COLUMNS on. Scores of sixteen columns
// at a time (their sums by lane_sums16), scaled, biased (`bias` + t * bias_token + c * bias_column
// for token t, column c) and masked past column `shared + t - 1`; softmax in sixteen-lane loops;
// the weighted sums of the values in registers, a few queries at a time. `scores` holds
// queries * round16(width) floats, `part` queries * 256, `inverse` queries. Query j's result goes
// to `out` + (j / group) * out_token + (j % group) * D.
template <typename T, int BLOCKS>
void attend_head16(const float* query, int64_t queries, int64_t group, const T* k, const T* v, int64_t column,
                   int64_t width, int64_t shared, const T* bias, int64_t bias_token, int64_t bias_column, float scale,
                   float* scores, float* part, float* inverse, T* out, int64_t out_token) {
  constexpr int64_t D = 16 * BLOCKS;
  constexpr int TILE = 24 / BLOCKS;  // queries whose sums stay in registers (TILE * BLOCKS of 32)
  const int64_t padded = (width + 15) / 16 * 16, line = D * static_cast<int64_t>(sizeof(T));
  const __m512 scaling = _mm512_set1_ps(scale), minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c0 = 0; c0 < width; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, width - c0);
    for (int64_t c = 0; c < n; ++c) {
      const T* kc = k + (c0 + c) * column;
      const int64_t next = c0 + c + PREFETCH_COLUMNS;  // keys, then the first values
      prefetch(next < width ? kc + PREFETCH_COLUMNS * column : v + (next - width) * column, line);
      __m512 key[BLOCKS];
      for (int m = 0; m < BLOCKS; ++m) key[m] = load16(kc + 16 * m);
      for (int64_t j = 0; j < queries; ++j) {
        const float* qj = query + j * D;
        __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(qj), key[0]);
        for (int m = 1; m < BLOCKS; ++m) sum = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 16 * m), key[m], sum);
        _mm512_storeu_ps(part + (j * 16 + c) * 16, sum);
      }
    }
    for (int64_t j = 0; j < queries; ++j) {
      float* pj = part + j * 256;
      for (int64_t c = n; c < 16; ++c) _mm512_storeu_ps(pj + c * 16, _mm512_setzero_ps());
      const int64_t t = j / group;
      const T* bj = bias + t * bias_token + c0 * bias_column;
      float b[16] = {};
      for (int64_t c = 0; c < n; ++c) b[c] = as_float(bj[c * bias_column]);
      __m512 s = _mm512_add_ps(_mm512_mul_ps(lane_sums16(pj), scaling), _mm512_loadu_ps(b));
      const int64_t seen = std::min<int64_t>(n, shared + t - c0);  // columns this token sees
      const __mmask16 hidden = seen <= 0 ? __mmask16(0xFFFF) : __mmask16(~((1u << seen) - 1u));
      _mm512_storeu_ps(scores + j * padded + c0, _mm512_mask_blend_ps(hidden, s, minus_inf));
    }
  }
  for (int64_t j = 0; j < queries; ++j) {
    float* sj = scores + j * padded;
    __m512 top = minus_inf;
    for (int64_t c = 0; c < padded; c += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(sj + c));
    const float highest = _mm512_reduce_max_ps(top);
    if (highest == -std::numeric_limits<float>::infinity()) {  // sees no column: a padding row
      std::fill(sj, sj + padded, 0.0f);
      inverse[j] = 0.0f;
      continue;
    }
    const __m512 shift = _mm512_set1_ps(highest);
    __m512 total = _mm512_setzero_ps();
    for (int64_t c = 0; c < padded; c += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sj + c), shift));
      _mm512_storeu_ps(sj + c, e);
      total = _mm512_add_ps(total, e);
    }
    inverse[j] = 1.0f / _mm512_reduce_add_ps(total);
  }
  for (int64_t j0 = 0; j0 < queries; j0 += TILE) {
    const int64_t nq = std::min<int64_t>(TILE, queries - j0);
    __m512 acc[TILE][BLOCKS];
    for (int q = 0; q < TILE; ++q)
      for (int m = 0; m < BLOCKS; ++m) acc[q][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < width; ++c) {
      const T* vc = v + c * column;
      if (j0 == 0 && c + PREFETCH_COLUMNS < width) prefetch(vc + PREFETCH_COLUMNS * column, line);
      float p[TILE];
      bool any = false;
      for (int q = 0; q < TILE; ++q) {
        p[q] = q < nq ? scores[(j0 + q) * padded + c] : 0.0f;
        any |= p[q] != 0.0f;
      }
      if (!any) continue;  // a column no query of the tile sees (padding)
      __m512 value[BLOCKS];
      for (int m = 0; m < BLOCKS; ++m) value[m] = load16(vc + 16 * m);
      for (int q = 0; q < TILE; ++q) {
        if (q >= nq) break;
        const __m512 weight = _mm512_set1_ps(p[q]);
        for (int m = 0; m < BLOCKS; ++m) acc[q][m] = _mm512_fmadd_ps(weight, value[m], acc[q][m]);
      }
    }
    for (int q = 0; q < TILE && q < nq; ++q) {
      const int64_t j = j0 + q;
      T* o = out + (j / group) * out_token + (j % group) * D;
      const __m512 w = _mm512_set1_ps(inverse[j]);
      for (int m = 0; m < BLOCKS; ++m) store16(o + 16 * m, _mm512_mul_ps(acc[q][m], w));
    }
  }
}
#endif

// The rows' attention of one layer after write_kv, a key/value head of a row at a time: its group
// of query heads, for each of the row's `tokens` tokens, reads each key and value once (converted to
// float32 once for all of them). Query head h of token t of row r ([B T, H, D] view) attends to
// columns `first` to `end + t` of its key/value head, scores scaled and biased (`bias` [B, 1, T,
// end + T - first]: the row's padding and, in a verify step, the tokens after t), softmax and sums in
// float32. Writes `out` [B T, H, D]. Heads of 16, 32, 64 or 128 floats take attend_head16 (with
// AVX-512); other widths the loops below, vectorized where the width is a multiple of 16.
template <typename T>
void grouped_attention_kernel(const Tensor& q, const Tensor& layer_kv, int64_t kv_heads, int64_t first, int64_t end,
                              int64_t tokens, const Tensor& bias, double scaling, Tensor& out) {
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2), rows = n / tokens;
  const int64_t group = heads / kv_heads, width = end + tokens - first, queries = group * tokens;
  TORCH_CHECK(q.stride(2) == 1 && bias.size(-1) == width && bias.size(-2) == tokens && out.stride(1) == d,
              "attention: unexpected layout");
  const T* cache = layer_kv.data_ptr<T>();
  const int64_t side = layer_kv.stride(0), row_stride = layer_kv.stride(1), head_stride = layer_kv.stride(2),
                column = layer_kv.stride(3);
  const T* qs = q.data_ptr<T>();
  const T* bs = bias.data_ptr<T>();
  const int64_t bias_row = bias.stride(0), bias_token = bias.stride(2), bias_column = bias.stride(3);
  T* os = out.data_ptr<T>();
  const int64_t out_row = out.stride(0);
  const float scale = static_cast<float>(scaling);
  const int64_t blocks = d / 16;
  const bool vectors = VECTOR_KERNELS && d % 16 == 0 && d <= MAX_HEAD_DIM;  // AVX-512 loops (else plain ones)
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> query(queries * d), scores(queries * width), acc(queries * d), vector(d), total(queries), part;
    for (int64_t item = begin; item < stop; ++item) {
      const int64_t r = item / kv_heads, g = item % kv_heads;
      for (int64_t j = 0; j < queries; ++j) {  // query j: token j / group, head g * group + j % group
        const T* qh = qs + (r * tokens + j / group) * q.stride(0) + (g * group + j % group) * q.stride(1);
        for (int64_t i = 0; i < d; ++i) query[j * d + i] = as_float(qh[i]);
      }
      const T* k = cache + r * row_stride + g * head_stride + first * column;
      const T* v = k + side;
      const int64_t shared = end - first + 1;  // columns every token of the row sees
#if defined(__AVX512F__)
      if (vectors && (blocks == 1 || blocks == 2 || blocks == 4 || blocks == 8)) {
        const int64_t padded = (width + 15) / 16 * 16;
        if (static_cast<int64_t>(scores.size()) < queries * padded) scores.resize(queries * padded);
        if (static_cast<int64_t>(part.size()) < queries * 256) part.resize(queries * 256);
        T* o = os + r * tokens * out_row + g * group * d;
        const T* b = bs + r * bias_row;
        const auto attend = blocks == 1 ? attend_head16<T, 1>
                            : blocks == 2 ? attend_head16<T, 2>
                            : blocks == 4 ? attend_head16<T, 4>
                                          : attend_head16<T, 8>;
        attend(query.data(), queries, group, k, v, column, width, shared, b, bias_token, bias_column, scale,
               scores.data(), part.data(), total.data(), o, out_row);
        continue;
      }
#endif
      const int64_t line = d * static_cast<int64_t>(sizeof(T));
      for (int64_t c = 0; c < width; ++c) {
        const T* kc = k + c * column;
        const int64_t next = c + PREFETCH_COLUMNS;  // keys, then the first values
        prefetch(next < width ? kc + PREFETCH_COLUMNS * column : v + (next - width) * column, line);
#if defined(__AVX512F__)
        __m512 key[MAX_HEAD_DIM / 16];
        if (vectors)
          for (int64_t m = 0; m < blocks; ++m) key[m] = load16(kc + 16 * m);
#endif
        if (!vectors)
          for (int64_t i = 0; i < d; ++i) vector[i] = as_float(kc[i]);
        for (int64_t j = 0; j < queries; ++j) {
          const int64_t t = j / group;
          if (c >= shared + t) {  // after the token: masked (a verify step's later draft tokens)
            scores[j * width + c] = -std::numeric_limits<float>::infinity();
            continue;
          }
          const float* qj = query.data() + j * d;
          float dot = 0.0f;
#if defined(__AVX512F__)
          if (vectors) {
            __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(qj), key[0]);
            for (int64_t m = 1; m < blocks; ++m) sum = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 16 * m), key[m], sum);
            dot = _mm512_reduce_add_ps(sum);
          }
#endif
          if (!vectors) {
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; ++i) dot += qj[i] * vector[i];
          }
          scores[j * width + c] = dot * scale + as_float(bs[r * bias_row + t * bias_token + c * bias_column]);
        }
      }
      for (int64_t j = 0; j < queries; ++j) {
        float* sj = scores.data() + j * width;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < width; ++c) top = std::max(top, sj[c]);
        total[j] = exp_in_place(sj, width, top);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t c = 0; c < width; ++c) {
        const T* vc = v + c * column;
        if (c + PREFETCH_COLUMNS < width) prefetch(vc + PREFETCH_COLUMNS * column, line);
#if defined(__AVX512F__)
        if (vectors) {
          __m512 value[MAX_HEAD_DIM / 16];
          for (int64_t m = 0; m < blocks; ++m) value[m] = load16(vc + 16 * m);
          for (int64_t j = 0; j < queries; ++j) {
            const float p = scores[j * width + c];
            if (p == 0.0f) continue;  // a masked column
            const __m512 weight = _mm512_set1_ps(p);
            float* aj = acc.data() + j * d;
            for (int64_t m = 0; m < blocks; ++m)
              _mm512_storeu_ps(aj + 16 * m, _mm512_fmadd_ps(weight, value[m], _mm512_loadu_ps(aj + 16 * m)));
          }
          continue;
        }
#endif
        for (int64_t i = 0; i < d; ++i) vector[i] = as_float(vc[i]);
        for (int64_t j = 0; j < queries; ++j) {
          const float p = scores[j * width + c];
          if (p == 0.0f) continue;  // a masked column
          float* aj = acc.data() + j * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) aj[i] += p * vector[i];
        }
      }
      for (int64_t j = 0; j < queries; ++j) {
        const float inverse = 1.0f / total[j];
        T* o = os + (r * tokens + j / group) * out_row + (g * group + j % group) * d;
        for (int64_t i = 0; i < d; ++i) o[i] = from_float<T>(acc[j * d + i] * inverse);
      }
    }
  });
}

// A step's prompt chunks (FastDecoder.step's chunks), after its decode rows on the token axis: the
// chunks' tokens in order from row `first_row`, chunk c's `lengths[c]` of them from `offsets[c]` in
// that order, at positions `starts[c]` on; their keys and values go to columns `starts[c]` on of the
// chunk's own buffer `kvs[c]` ([layers, 2, Hkv, L, D]).
struct Chunks {
  std::vector<Tensor> kvs;
  std::vector<int64_t> starts, lengths, offsets;
  int64_t first_row = 0;
  int64_t total = 0;  // tokens of all chunks
  std::vector<int64_t> token_chunk;  // per token of the chunks: its chunk
  std::vector<int64_t> small;  // the chunks attended in chunk_attention_kernel (see SMALL_CHUNK)
  std::vector<int64_t> large;  // the others, attended through ATen one by one
  std::vector<int64_t> small_tokens;  // their tokens (indices into token_chunk)

  Chunks(const std::vector<Tensor>& buffers, at::IntArrayRef chunk_starts, at::IntArrayRef chunk_lengths,
         int64_t first, int64_t layers, int64_t kv_heads, int64_t head_dim, at::ScalarType dtype)
      : kvs(buffers), starts(chunk_starts.vec()), lengths(chunk_lengths.vec()), first_row(first) {
    TORCH_CHECK(starts.size() == kvs.size() && lengths.size() == kvs.size(), "chunks: one start and length each");
    for (size_t c = 0; c < kvs.size(); ++c) {
      const Tensor& kv = kvs[c];
      TORCH_CHECK(kv.dim() == 5 && kv.size(0) == layers && kv.size(1) == 2 && kv.size(2) == kv_heads &&
                      kv.size(4) == head_dim && kv.stride(4) == 1 && kv.scalar_type() == dtype,
                  "chunk ", c, ": its buffer is not [layers, 2, Hkv, L, D] in the model's dtype");
      TORCH_CHECK(lengths[c] >= 1 && starts[c] >= 0 && starts[c] + lengths[c] <= kv.size(3),
                  "chunk ", c, ": its columns do not fit its buffer");
      offsets.push_back(total);
      const bool is_small = lengths[c] * (starts[c] + lengths[c]) <= SMALL_CHUNK;
      (is_small ? small : large).push_back(static_cast<int64_t>(c));
      for (int64_t t = 0; t < lengths[c]; ++t) {
        if (is_small) small_tokens.push_back(total + t);
        token_chunk.push_back(static_cast<int64_t>(c));
      }
      total += lengths[c];
    }
  }
};

// Writes the chunks' keys and values ([tokens, Hkv, D] views of the step's, chunk tokens only, in
// order) into their buffers at layer `layer`.
template <typename T>
void write_chunk_kv(const Tensor& keys, const Tensor& values, const Chunks& chunks, int64_t layer) {
  const int64_t kv_heads = keys.size(1), d = keys.size(2);
  TORCH_CHECK(keys.stride(2) == 1 && values.stride(2) == 1, "chunk keys and values: unexpected layout");
  const T* ks = keys.data_ptr<T>();
  const T* vs = values.data_ptr<T>();
  std::vector<T*> bases(chunks.kvs.size());
  for (size_t c = 0; c < bases.size(); ++c) {
    const Tensor& kv = chunks.kvs[c];
    TORCH_CHECK(kv.stride(4) == 1 && kv.scalar_type() == keys.scalar_type(), "chunk buffer: unexpected layout");
    bases[c] = kv.data_ptr<T>() + layer * kv.stride(0);
  }
  at::parallel_for(0, chunks.total * kv_heads, 64, [&](int64_t begin, int64_t stop) {
    for (int64_t i = begin; i < stop; ++i) {
      const int64_t token = i / kv_heads, g = i % kv_heads, c = chunks.token_chunk[token];
      const Tensor& kv = chunks.kvs[c];
      const int64_t column = chunks.starts[c] + token - chunks.offsets[c];
      T* k = bases[c] + g * kv.stride(2) + column * kv.stride(3);
      std::memcpy(k, ks + token * keys.stride(0) + g * keys.stride(1), d * sizeof(T));
      std::memcpy(k + kv.stride(1), vs + token * values.stride(0) + g * values.stride(1), d * sizeof(T));
    }
  });
}

// The small chunks' attention at layer `layer`, after write_chunk_kv: query head h of a chunk's
// token t (its row of `q` [N, H, D]) attends causally to columns 0 to starts[c] + t of its buffer.
// Writes those rows of `out` [N, H, D].
template <typename T>
void chunk_attention_kernel(const Tensor& q, const Chunks& chunks, int64_t layer, int64_t kv_heads, double scaling,
                            Tensor& out) {
  const int64_t heads = q.size(1), d = q.size(2), group = heads / kv_heads;
  int64_t width = 0;
  for (int64_t c : chunks.small) width = std::max(width, chunks.starts[c] + chunks.lengths[c]);
  const T* qs = q.data_ptr<T>();
  T* os = out.data_ptr<T>();
  const float scale = static_cast<float>(scaling);
  const int64_t items = static_cast<int64_t>(chunks.small_tokens.size()) * heads;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> scores(width), query(d), acc(d);
    for (int64_t i = begin; i < stop; ++i) {
      const int64_t token = chunks.small_tokens[i / heads], h = i % heads, c = chunks.token_chunk[token];
      const int64_t row = chunks.first_row + token, t = token - chunks.offsets[c];
      const Tensor& kv = chunks.kvs[c];
      const T* qh = qs + row * q.stride(0) + h * q.stride(1);
      for (int64_t j = 0; j < d; ++j) query[j] = as_float(qh[j]);
      const T* k = kv.data_ptr<T>() + layer * kv.stride(0) + (h / group) * kv.stride(2);
      attend_one<T>(query.data(), k, k + kv.stride(1), kv.stride(3), chunks.starts[c] + t + 1, nullptr, 0, scale, d,
                    scores.data(), acc.data(), os + row * out.stride(0) + h * d);
    }
  });
}

// A long chunk's attention at layer `layer` through ATen's fused kernel (what FastDecoder._layers
// runs for every chunk): causal over itself, and over all of the prefix before it. Writes its rows
// of `out`.
void aten_chunk_attention(const Tensor& q, const Chunks& chunks, int64_t c, int64_t layer, double scaling,
                          Tensor& out) {
  const int64_t start = chunks.starts[c], n = chunks.lengths[c], stop = start + n;
  const Tensor layer_kv = chunks.kvs[c].select(0, layer);  // [2, Hkv, L, D]
  const Tensor k = layer_kv.select(0, 0).narrow(1, 0, stop).unsqueeze(0);
  const Tensor v = layer_kv.select(0, 1).narrow(1, 0, stop).unsqueeze(0);
  const int64_t row = chunks.first_row + chunks.offsets[c];
  const Tensor qc = q.narrow(0, row, n).transpose(0, 1).unsqueeze(0);  // [1, H, n, D]
  std::optional<Tensor> mask;
  if (start > 0) {  // query i reads columns up to start + i
    const auto options = q.options().dtype(at::kLong);
    mask = at::arange(stop, options).unsqueeze(0) <= (at::arange(n, options) + start).unsqueeze(1);
  }
  const Tensor result = at::scaled_dot_product_attention(qc, k, v, mask, 0.0, start == 0, scaling, true);
  out.narrow(0, row, n).copy_(result.squeeze(0).transpose(0, 1));
}

template <typename F>
void dispatch_float(const Tensor& t, const char* what, F&& f) {
  if (t.scalar_type() == at::kFloat) {
    f(float());
  } else if (t.scalar_type() == at::kBFloat16) {
    f(c10::BFloat16());
  } else {
    TORCH_CHECK(false, what, ": float32 or bfloat16 expected, got ", t.scalar_type());
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool INT8_ROWS_KERNEL = true;

// out[r, j] = (q[r] . w[j]) * w_scale[j], rounded to the dtype, for M rows `q` [M, K] int8 and the
// weight `w` [N, K] int8 (row-major) whose rows sum to `w_sum` [N]: four weight rows at a time,
// each 64 bytes loaded once for all M rows (and the next four rows prefetched), products summed in
// int32 by VNNI's unsigned-by-signed dot product (the rows offset by 128 to make them unsigned, and
// 128 times the weight row's sum taken off again).
template <typename T, int M>
void int8_rows_kernel(const Tensor& q, const Tensor& w, const Tensor& w_sum, const Tensor& w_scale, Tensor& out) {
  const int64_t k = q.size(1), n = w.size(0), body = k - k % 64;
  std::vector<uint8_t> shifted(M * k);
  const int8_t* qs = q.data_ptr<int8_t>();
  for (int64_t i = 0; i < M * k; ++i) shifted[i] = static_cast<uint8_t>(qs[i] ^ 0x80);  // q + 128
  const uint8_t* xu = shifted.data();
  const int8_t* ws = w.data_ptr<int8_t>();
  const int32_t* sums = w_sum.data_ptr<int32_t>();
  const float* scales = w_scale.data_ptr<float>();
  T* os = out.data_ptr<T>();
  auto finish = [&](int64_t r, int64_t j, int32_t dot) {
    for (int64_t i = body; i < k; ++i) dot += static_cast<int32_t>(xu[r * k + i]) * static_cast<int32_t>(ws[j * k + i]);
    os[r * n + j] = from_float<T>(static_cast<float>(dot - 128 * sums[j]) * scales[j]);
  };
  at::parallel_for(0, (n + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t j = group * 4;
      if (j + 4 > n) {  // the last rows, one at a time
        for (int64_t jj = j; jj < n; ++jj) {
          for (int64_t r = 0; r < M; ++r) {
            __m512i acc = _mm512_setzero_si512();
            for (int64_t i = 0; i < body; i += 64)
              acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(xu + r * k + i), _mm512_loadu_si512(ws + jj * k + i));
            finish(r, jj, _mm512_reduce_add_epi32(acc));
          }
        }
        continue;
      }
      const int8_t* w0 = ws + j * k;
      __m512i acc[M][4];
      for (int r = 0; r < M; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_si512();
      for (int64_t i = 0; i < body; i += 64) {
        for (int c = 0; c < 4; ++c) _mm_prefetch(reinterpret_cast<const char*>(w0 + (4 + c) * k + i), _MM_HINT_T0);
        const __m512i b0 = _mm512_loadu_si512(w0 + i), b1 = _mm512_loadu_si512(w0 + k + i),
                      b2 = _mm512_loadu_si512(w0 + 2 * k + i), b3 = _mm512_loadu_si512(w0 + 3 * k + i);
        for (int r = 0; r < M; ++r) {
          const __m512i a = _mm512_loadu_si512(xu + r * k + i);
          acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, b0);
          acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, b1);
          acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], a, b2);
          acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], a, b3);
        }
      }
      for (int r = 0; r < M; ++r)
        for (int c = 0; c < 4; ++c) finish(r, j + c, _mm512_reduce_add_epi32(acc[r][c]));
    }
  });
}

template <typename T>
void int8_rows(const Tensor& q, const Tensor& w, const Tensor& w_sum, const Tensor& w_scale, Tensor& out) {
  switch (q.size(0)) {
    case 1: return int8_rows_kernel<T, 1>(q, w, w_sum, w_scale, out);
    case 2: return int8_rows_kernel<T, 2>(q, w, w_sum, w_scale, out);
    case 3: return int8_rows_kernel<T, 3>(q, w, w_sum, w_scale, out);
    default: return int8_rows_kernel<T, 4>(q, w, w_sum, w_scale, out);
  }
}
#else
constexpr bool INT8_ROWS_KERNEL = false;

template <typename T>
void int8_rows(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&) {
  TORCH_CHECK(false, "int8 rows kernel: built without AVX512-VNNI");
}
#endif

// Up to this many rows (with AVX512-VNNI) an int8 product runs in int8_rows_kernel, which streams a
// one-row product's weight at about twice the rate of oneDNN's kernel (built for blocks of rows;
// 5.9 against 11.8 ms for the default model's layer products at one row, 2 threads); from more rows
// through oneDNN (AMX where the CPU has it).
constexpr int64_t INT8_KERNEL_ROWS = 4;

Tensor int8_product(const Tensor& x, const Tensor& weight, const Tensor& scale, const Tensor& zero_points,
                    const OptTensor& inverse, const OptTensor& bias, const OptTensor& rows_weight,
                    const OptTensor& rows_sum) {
  Tensor xc = x.contiguous();
  Tensor q = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  Tensor row_scale = at::empty({xc.size(0), 1}, xc.options().dtype(at::kFloat));
  const float* inv = inverse.has_value() ? inverse->data_ptr<float>() : nullptr;
  dispatch_float(xc, "int8 product input", [&](auto tag) {
    quantize_rows_kernel<decltype(tag)>(xc, inv, q, row_scale);
  });
  Tensor out;
  if (INT8_ROWS_KERNEL && rows_weight.has_value() && rows_sum.has_value() && xc.size(0) <= INT8_KERNEL_ROWS) {
    out = at::empty({xc.size(0), rows_weight->size(0)}, xc.options());
    dispatch_float(out, "int8 product output", [&](auto tag) {
      int8_rows<decltype(tag)>(q, *rows_weight, *rows_sum, scale, out);
    });
  } else {
    out = qlinear_pointwise(q, weight, scale, zero_points, x.scalar_type());
  }
  dispatch_float(out, "int8 product output", [&](auto tag) { scale_rows_kernel<decltype(tag)>(out, row_scale, bias); });
  return out;
}

// One product of `x` [N, K]: `params` from `at` on, `count` of them, as native.py lays them out.
Tensor product(const Tensor& x, int64_t kind, const c10::List<OptTensor>& params, int64_t at, int64_t count) {
  auto get = [&](int64_t i) -> OptTensor { return params.get(at + i); };
  auto plain = [&](int64_t first) {
    const int64_t parts = (count - first) / 2;
    if (parts == 1) return at::linear(x, *get(first), get(first + 1));
    std::vector<Tensor> outs;
    outs.reserve(parts);
    for (int64_t p = 0; p < parts; ++p) outs.push_back(at::linear(x, *get(first + 2 * p), get(first + 2 * p + 1)));
    return at::cat(outs, -1);
  };
  if (kind == PLAIN) return plain(0);
  if (kind == PACKED) {
    if (x.size(0) == 1 && count > 2) return plain(2);
    return linear_pointwise(x, *get(0), get(1));
  }
  TORCH_CHECK(kind == INT8, "unknown product kind ", kind);
  return int8_product(x, *get(0), *get(1), *get(2), get(3), get(4), get(5), get(6));
}

struct Layer {
  Tensor input_norm, post_norm, q_norm, k_norm;
  int64_t kinds[4], counts[4], offsets[4];
};

// The layers as `params` and `layout` describe them (native.py's layer_spec).
std::vector<Layer> parse_layers(const c10::List<OptTensor>& params, at::IntArrayRef layout) {
  std::vector<Layer> out;
  int64_t p = 0;
  size_t l = 0;
  while (l < layout.size()) {
    Layer layer;
    layer.input_norm = *params.get(p++);
    layer.post_norm = *params.get(p++);
    if (layout[l++] != 0) {
      layer.q_norm = *params.get(p++);
      layer.k_norm = *params.get(p++);
    }
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK(l + 2 <= layout.size(), "step_layers: the layout ends inside a layer");
      layer.kinds[k] = layout[l++];
      layer.counts[k] = layout[l++];
      layer.offsets[k] = p;
      p += layer.counts[k];
    }
    out.push_back(layer);
  }
  TORCH_CHECK(p == static_cast<int64_t>(params.size()), "step_layers: params and layout do not match the layers");
  return out;
}

// The decoder layers of one step (FastDecoder._layers): `x` [N, E] the embeddings of the step's
// tokens, `cos`/`sin` [N, D] their rotations; first the decode rows' `rows` times `tokens` tokens (a
// decode step's one a row; a verify step's last token and its draft), then the prompt chunks' tokens
// (`chunk_kvs`, `chunk_starts`, `chunk_lengths`: see Chunks), then padding nothing reads (its
// attention is 0, as in the Python layers). The rows attend over `kv`, the padded batch's buffer,
// whose columns `first` to `end - 1` hold their context and columns `end` to `end + T - 1` get the
// step's keys and values, with `bias` [B, 1, T, end + T - first]; `kv` and `bias` are None without
// rows. `params` and `layout` describe the layers (native.py). Returns the hidden states [N, E]
// before the final norm.
Tensor step_layers(Tensor x, const Tensor& cos, const Tensor& sin, const OptTensor& kv, int64_t first, int64_t end,
                   const OptTensor& bias, int64_t rows, int64_t tokens, at::TensorList chunk_kvs,
                   at::IntArrayRef chunk_starts, at::IntArrayRef chunk_lengths, const c10::List<OptTensor>& params,
                   at::IntArrayRef layout, double eps, double scaling, int64_t heads, int64_t kv_heads,
                   int64_t head_dim) {
  const int64_t n = x.size(0), d = head_dim, b = rows * tokens;
  const int64_t q_width = heads * d, kv_width = kv_heads * d;
  const std::vector<Layer> layers = parse_layers(params, layout);
  const Chunks chunks(chunk_kvs.vec(), chunk_starts, chunk_lengths, b, static_cast<int64_t>(layers.size()), kv_heads,
                      d, x.scalar_type());
  TORCH_CHECK(b + chunks.total <= n && cos.size(0) == n && sin.size(0) == n, "step_layers: more tokens than rows of x");
  if (rows > 0) {
    TORCH_CHECK(kv.has_value() && bias.has_value() && tokens >= 1, "step_layers: rows without a buffer or bias");
    TORCH_CHECK(kv->size(0) == static_cast<int64_t>(layers.size()) && kv->size(2) >= rows &&
                    end + tokens <= kv->size(4) && kv->scalar_type() == x.scalar_type(),
                "step_layers: unexpected batch layout");
  }
  x = x.contiguous().clone();  // the residual, written in place
  Tensor h = at::empty_like(x);
  Tensor attn = at::empty({n, heads, d}, x.options());
  attn.narrow(0, b + chunks.total, n - b - chunks.total).zero_();  // padding: written by nothing below
  dispatch_float(x, "hidden states", [&](auto tag) {
    using T = decltype(tag);
    add_rms_norm_kernel<T>(x, nullptr, layers[0].input_norm, eps, h);
  });
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& layer = layers[i];
    const int64_t index = static_cast<int64_t>(i);
    const Tensor qkv = product(h, layer.kinds[0], params, layer.offsets[0], layer.counts[0]);
    Tensor qk = qkv.narrow(1, 0, q_width + kv_width).view({n, heads + kv_heads, d});
    if (layer.q_norm.defined()) {
      qk = at::cat({at::rms_norm(qk.narrow(1, 0, heads), {d}, layer.q_norm, eps),
                    at::rms_norm(qk.narrow(1, heads, kv_heads), {d}, layer.k_norm, eps)},
                   1);
    } else {
      qk = qk.clone();  // rotated in place; qkv's values are read below
    }
    const Tensor values = qkv.narrow(1, q_width + kv_width, kv_width).view({n, kv_heads, d});
    dispatch_float(x, "hidden states", [&](auto tag) {
      using T = decltype(tag);
      rotary_kernel<T>(qk, cos, sin);
      const Tensor q = qk.narrow(1, 0, heads), keys = qk.narrow(1, heads, kv_heads);
      if (b > 0) {
        const Tensor layer_kv = kv->select(0, index);
        write_kv<T>(keys.narrow(0, 0, b), values.narrow(0, 0, b), layer_kv, end, tokens);
        Tensor rows_attn = attn.narrow(0, 0, b);
        grouped_attention_kernel<T>(q.narrow(0, 0, b), layer_kv, kv_heads, first, end, tokens, *bias, scaling,
                                    rows_attn);
      }
      if (chunks.total > 0) {
        write_chunk_kv<T>(keys.narrow(0, b, chunks.total), values.narrow(0, b, chunks.total), chunks, index);
        if (!chunks.small.empty()) chunk_attention_kernel<T>(q, chunks, index, kv_heads, scaling, attn);
        for (int64_t chunk : chunks.large) aten_chunk_attention(q, chunks, chunk, index, scaling, attn);
      }
    });
    const Tensor o = product(attn.view({n, q_width}), layer.kinds[1], params, layer.offsets[1], layer.counts[1]);
    dispatch_float(x, "hidden states", [&](auto tag) {
      add_rms_norm_kernel<decltype(tag)>(x, &o, layer.post_norm, eps, h);
    });
    const Tensor gate_up = product(h, layer.kinds[2], params, layer.offsets[2], layer.counts[2]);
    Tensor act = at::empty({n, gate_up.size(1) / 2}, gate_up.options());
    dispatch_float(x, "hidden states", [&](auto tag) { silu_mul_kernel<decltype(tag)>(gate_up, act); });
    const Tensor down = product(act, layer.kinds[3], params, layer.offsets[3], layer.counts[3]);
    if (i + 1 < layers.size()) {
      dispatch_float(x, "hidden states", [&](auto tag) {
        add_rms_norm_kernel<decltype(tag)>(x, &down, layers[i + 1].input_norm, eps, h);
      });
    } else {
      x.add_(down);
    }
  }
  return x;
}

// Each row's argmax over `logits` [N, V] into `out` [N]: the first index of the row's largest value,
// a NaN counting as the largest (torch's argmax), rows in parallel. The row's maximum in sixteen
// lanes, then the first column that holds it (the row is in the core's cache by then).
template <typename T>
void greedy_kernel(const Tensor& logits, Tensor& out) {
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(logits.stride(1) == 1, "greedy: rows must be contiguous");
  const T* base = logits.data_ptr<T>();
  int64_t* chosen = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t r = begin; r < stop; ++r) {
      const T* x = base + r * stride;
      float best = -std::numeric_limits<float>::infinity();
      bool nan = false;
      int64_t c = 0;
#if defined(__AVX512F__)
      __m512 top = _mm512_set1_ps(best);
      __mmask16 unordered = 0;
      for (; c + 16 <= n; c += 16) {
        const __m512 v = load16(x + c);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        top = _mm512_max_ps(top, v);
      }
      best = _mm512_reduce_max_ps(top);
      nan = unordered != 0;
#endif
      for (; c < n; ++c) {
        const float v = as_float(x[c]);
        nan |= std::isnan(v);
        best = std::max(best, v);
      }
      int64_t found = 0;
      if (nan) {
        while (!std::isnan(as_float(x[found]))) ++found;
      } else {
        c = 0;
#if defined(__AVX512F__)
        const __m512 target = _mm512_set1_ps(best);
        for (; c + 16 <= n; c += 16) {
          const __mmask16 hit = _mm512_cmp_ps_mask(load16(x + c), target, _CMP_EQ_OQ);
          if (hit) break;
        }
#endif
        while (as_float(x[c]) != best) ++c;
        found = c;
      }
      chosen[r] = found;
    }
  });
}

Tensor greedy(const Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "greedy: logits must be [N, V] with V > 0");
  Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  dispatch_float(logits, "greedy", [&](auto zero) { greedy_kernel<decltype(zero)>(logits, out); });
  return out;
}

// A single product, for the tests: the kinds as step_layers runs them.
Tensor run_product(const Tensor& x, const c10::List<OptTensor>& params, int64_t kind) {
  return product(x, kind, params, 0, static_cast<int64_t>(params.size()));
}

}  // namespace

TORCH_LIBRARY(async_llm_native, m) {
  m.def(
      "step_layers(Tensor x, Tensor cos, Tensor sin, Tensor? kv, int first, int end, Tensor? bias, int rows, "
      "int tokens, Tensor[] chunk_kvs, int[] chunk_starts, int[] chunk_lengths, Tensor?[] params, int[] layout, "
      "float eps, float scaling, int heads, int kv_heads, int head_dim) -> Tensor");
  m.def("product(Tensor x, Tensor?[] params, int kind) -> Tensor");
  m.def("greedy(Tensor logits) -> Tensor");
}

// Any backend key: the prepacked weights are oneDNN tensors (MkldnnCPU) beside CPU ones.
TORCH_LIBRARY_IMPL(async_llm_native, CompositeExplicitAutograd, m) {
  m.impl("step_layers", &step_layers);
  m.impl("product", &run_product);
  m.impl("greedy", &greedy);
}
