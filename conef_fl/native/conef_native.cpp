// Fused CPU kernels of conef-fl's count sketch and scaled-sign decoding (optional; see docs/design.md).
//
// Every kernel reproduces the arithmetic of the pure-torch path it replaces (conef_fl/native/__init__.py
// says which), term by term and in the same order, so that results are bit-identical:
//   * a sparse product row  y = fma(alpha, sum_j s_j * x_j, y)  with the sum in the order of the
//     CSR positions (what torch's CPU CSR addmm computes);
//   * 16-bit tables: widened to float32, accumulated in float32, rounded into the table once.
// Work is split over buckets (update) or units (recovery), so results do not depend on the thread count.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef __F16C__
#include <immintrin.h>
#endif

namespace {

//: Columns summed in registers at a time by the update (32 was fastest of 16/32/64/128 at d = 10M).
constexpr int64_t kBlock = 32;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };


void check_cpu_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Rows converted between the table's dtype and the compute dtype in bulk (vectorised where the CPU
// has the instructions; round to nearest even, as torch's conversions; the values are finite).
template <typename T, typename A>
inline void load_row(const T* src, A* dst, int64_t m) {
  for (int64_t j = 0; j < m; ++j) dst[j] = static_cast<A>(src[j]);
}
template <typename T, typename A>
inline void store_row(T* dst, const A* src, int64_t m) {
  for (int64_t j = 0; j < m; ++j) dst[j] = static_cast<T>(src[j]);
}
template <>
inline void load_row<c10::BFloat16, float>(const c10::BFloat16* src, float* dst, int64_t m) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t u = static_cast<uint32_t>(s[j]) << 16;
    std::memcpy(dst + j, &u, 4);
  }
}
template <>
inline void store_row<c10::BFloat16, float>(c10::BFloat16* dst, const float* src, int64_t m) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j = 0; j < m; ++j) {
    uint32_t u;
    std::memcpy(&u, src + j, 4);
    d[j] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}
#ifdef __F16C__
template <>
inline void load_row<c10::Half, float>(const c10::Half* src, float* dst, int64_t m) {
  int64_t j = 0;
  for (; j + 8 <= m; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  for (; j < m; ++j) dst[j] = static_cast<float>(src[j]);
}
template <>
inline void store_row<c10::Half, float>(c10::Half* dst, const float* src, int64_t m) {
  int64_t j = 0;
  for (; j + 8 <= m; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; j < m; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}
#endif

// Ask for the cache lines of a row about to be read (each unit is a separate page: the hardware
// prefetchers stop at page boundaries).
template <typename A>
inline void prefetch_row(const A* row, int64_t m) {
  const char* c = reinterpret_cast<const char*>(row);
  const int64_t bytes = m * static_cast<int64_t>(sizeof(A));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 0);
}

// Every index of the int32/int64 tensor idx lies in [0, n) (one pass over the indices).
bool in_range(const at::Tensor& idx, int64_t n) {
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, "indices must be int32 or int64");
  const int64_t k = idx.numel();
  bool ok = true;
  if (idx.scalar_type() == at::kInt) {
    const int32_t* p = idx.data_ptr<int32_t>();
    for (int64_t i = 0; i < k; ++i) ok &= (p[i] >= 0) & (p[i] < n);
  } else {
    const int64_t* p = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < k; ++i) ok &= (p[i] >= 0) & (p[i] < n);
  }
  return ok;
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "conef_native reads packed sign bits as little-endian words"
#endif

// Bits [g, g + 57) of the packed bits sb (nbytes bytes), as the low bits of a word (bytes past the end read as 0).
inline uint64_t bits_at(const uint8_t* sb, int64_t nbytes, int64_t g) {
  const int64_t i = g >> 3;
  uint64_t w = 0;
  std::memcpy(&w, sb + i, static_cast<size_t>(std::min<int64_t>(8, nbytes - i)));
  return w >> (g & 7);
}

// sum[k] +-= x[k] for k < nb <= kBlock (the unit's sign: plus or minus); with sign bits (sb != nullptr),
// x[k] + (bit g + k of sb ? sp : sn) instead of x[k], rounded once (sign_add_'s sum).
template <typename A>
__attribute__((always_inline)) inline void add_unit(A* sum, const A* x, const uint8_t* sb, int64_t nbytes, int64_t g,
                                                    A sp, A sn, bool plus, int64_t nb) {
  if (sb == nullptr) {
    if (plus) {
      for (int64_t k = 0; k < nb; ++k) sum[k] = sum[k] + x[k];
    } else {
      for (int64_t k = 0; k < nb; ++k) sum[k] = sum[k] - x[k];
    }
    return;
  }
  const uint64_t w = bits_at(sb, nbytes, g);  // kBlock = 32 <= 57 bits
  int64_t k = 0;
#ifdef __AVX2__
  if constexpr (std::is_same<A, float>::value) {  // +-s chosen by each lane's bit, eight lanes at a time
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 vp = _mm256_set1_ps(sp), vn = _mm256_set1_ps(sn);
    for (; k + 8 <= nb; k += 8) {
      const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>((w >> k) & 0xffu)), lane);
      const __m256 e = _mm256_blendv_ps(vn, vp, _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, lane)));
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + k), e);
      const __m256 acc = _mm256_loadu_ps(sum + k);
      _mm256_storeu_ps(sum + k, plus ? _mm256_add_ps(acc, v) : _mm256_sub_ps(acc, v));
    }
  }
#endif
  for (; k < nb; ++k) {
    const A v = x[k] + (((w >> k) & 1u) ? sp : sn);
    sum[k] = plus ? sum[k] + v : sum[k] - v;
  }
}

// table[b, :] = round( (table[b, :] * factor[b]) + alpha * sum_{p in [crow[b], crow[b+1])} val[p] * x[col[p], :] )
// (+ the tail unit's columns in its bucket), accumulated in Acc<T>.
template <typename T, typename I>
void scatter_impl(at::Tensor& table, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                  const at::Tensor& val, double alpha, const c10::optional<at::Tensor>& factor,
                  const c10::optional<at::Tensor>& tail, int64_t tail_bucket, double tail_alpha,
                  int64_t tail_factor_cols, double tail_factor, const c10::optional<at::Tensor>& signs,
                  double s) {
  using A = typename Acc<T>::type;
  const int64_t W = table.size(0), m = table.size(1);
  T* tab = table.data_ptr<T>();
  const A* xs = x.data_ptr<A>();
  const int32_t* cr = crow.data_ptr<int32_t>();
  const I* cl = col.data_ptr<I>();
  const A* vs = val.data_ptr<A>();
  const float* fac = factor.has_value() ? factor->data_ptr<float>() : nullptr;
  const A* tl = tail.has_value() ? tail->data_ptr<A>() : nullptr;
  const int64_t tn = tail.has_value() ? tail->numel() : 0;
  const A a = static_cast<A>(alpha);
  const A ta = static_cast<A>(tail_alpha);
  // with signs: every value read is x + (bit ? s : -s), rounded once (sign_add_'s sum), computed in
  // registers as it is summed (add_unit) instead of being written back to x
  const uint8_t* sb = signs.has_value() ? signs->data_ptr<uint8_t>() : nullptr;
  const A sp = static_cast<A>(static_cast<float>(s)), sn = -sp;
  const int64_t nsb = signs.has_value() ? signs->numel() : 0;
  std::vector<A> tail_fixed;
  if (sb != nullptr && tl != nullptr) {
    const int64_t off = x.size(0) * m;
    tail_fixed.resize(tn);
    for (int64_t j = 0; j < tn; ++j)
      tail_fixed[j] = tl[j] + (((sb[(off + j) >> 3] >> ((off + j) & 7)) & 1) ? sp : sn);
    tl = tail_fixed.data();
  }
  at::parallel_for(0, W, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> acc(m);
    for (int64_t b = b0; b < b1; ++b) {
      T* row = tab + b * m;
      load_row(row, acc.data(), m);
      if (fac != nullptr) {
        // rounded to the table's dtype first, as the separate in-place multiplication does
        const A f = static_cast<A>(fac[b]);
        for (int64_t j = 0; j < m; ++j) acc[j] = acc[j] * f;
        if (b == tail_bucket && tail_factor_cols > 0) {
          const A tf = static_cast<A>(tail_factor);
          load_row(row, acc.data(), tail_factor_cols);
          for (int64_t j = 0; j < tail_factor_cols; ++j) acc[j] = acc[j] * tf;
        }
        store_row(row, acc.data(), m);
        load_row(row, acc.data(), m);
      }
      const int32_t p0 = cr[b], p1 = cr[b + 1];
      if (p1 > p0) {
        // column blocks held in registers, every unit of the bucket read in turn: several rows
        // (pages) stream at once; per column the terms are summed in CSR order
        int64_t j0 = 0;
        for (; j0 + kBlock <= m; j0 += kBlock) {
          A sum[kBlock];
          for (int64_t k = 0; k < kBlock; ++k) sum[k] = A(0);
          for (int32_t p = p0; p < p1; ++p) {
            const int64_t g = static_cast<int64_t>(cl[p]) * m + j0;
            add_unit(sum, xs + g, sb, nsb, g, sp, sn, vs[p] >= A(0), kBlock);
          }
          for (int64_t k = 0; k < kBlock; ++k) acc[j0 + k] = std::fma(a, sum[k], acc[j0 + k]);
        }
        if (j0 < m) {
          const int64_t nb = m - j0;
          A sum[kBlock];
          for (int64_t k = 0; k < nb; ++k) sum[k] = A(0);
          for (int32_t p = p0; p < p1; ++p) {
            const int64_t g = static_cast<int64_t>(cl[p]) * m + j0;
            add_unit(sum, xs + g, sb, nsb, g, sp, sn, vs[p] >= A(0), nb);
          }
          for (int64_t k = 0; k < nb; ++k) acc[j0 + k] = std::fma(a, sum[k], acc[j0 + k]);
        }
      }
      if (tl != nullptr && b == tail_bucket) {
        for (int64_t j = 0; j < tn; ++j) acc[j] = std::fma(ta, tl[j], acc[j]);
      }
      store_row(row, acc.data(), m);
    }
  });
}

void sketch_scatter_(at::Tensor table, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                     const at::Tensor& val, double alpha, const c10::optional<at::Tensor>& factor,
                     const c10::optional<at::Tensor>& tail, int64_t tail_bucket, double tail_alpha,
                     int64_t tail_factor_cols, double tail_factor, const c10::optional<at::Tensor>& signs,
                     double s) {
  check_cpu_contig(table, "table");
  check_cpu_contig(x, "x");
  check_cpu_contig(crow, "crow");
  check_cpu_contig(col, "col");
  check_cpu_contig(val, "val");
  TORCH_CHECK(table.dim() == 2 && x.dim() == 2 && x.size(1) == table.size(1), "table (W, m) and x (n, m) expected");
  TORCH_CHECK(crow.scalar_type() == at::kInt && crow.numel() == table.size(0) + 1, "crow: W + 1 int32 expected");
  TORCH_CHECK(col.numel() == val.numel(), "col and val differ in length");
  const auto acc_t = table.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(x.scalar_type() == acc_t && val.scalar_type() == acc_t, "x and val must be in the compute dtype");
  if (factor.has_value()) {
    check_cpu_contig(*factor, "factor");
    TORCH_CHECK(factor->scalar_type() == at::kFloat && factor->numel() == table.size(0), "factor: W float32");
  }
  if (tail.has_value()) {
    check_cpu_contig(*tail, "tail");
    TORCH_CHECK(tail->scalar_type() == acc_t && tail->numel() <= table.size(1), "tail: at most m values");
    TORCH_CHECK(tail_bucket >= 0 && tail_bucket < table.size(0), "tail_bucket out of range");
  }
  TORCH_CHECK(tail_factor_cols <= table.size(1), "tail_factor_cols out of range");
  TORCH_CHECK(in_range(col, x.size(0)), "col out of range");
  if (signs.has_value()) {
    check_cpu_contig(*signs, "signs");
    const int64_t n = x.numel() + (tail.has_value() ? tail->numel() : 0);
    TORCH_CHECK(signs->scalar_type() == at::kByte && signs->numel() == (n + 7) / 8,
                "signs: ceil(numel / 8) uint8 bytes expected");
    TORCH_CHECK(acc_t == at::kFloat, "signs need a float32 compute dtype");
  }
#define CONEF_SCATTER(T)                                                                                   \
  if (col.scalar_type() == at::kInt)                                                                       \
    scatter_impl<T, int32_t>(table, x, crow, col, val, alpha, factor, tail, tail_bucket, tail_alpha,       \
                             tail_factor_cols, tail_factor, signs, s);                                     \
  else                                                                                                     \
    scatter_impl<T, int64_t>(table, x, crow, col, val, alpha, factor, tail, tail_bucket, tail_alpha,       \
                             tail_factor_cols, tail_factor, signs, s);
  switch (table.scalar_type()) {
    case at::kFloat: CONEF_SCATTER(float) break;
    case at::kDouble: CONEF_SCATTER(double) break;
    case at::kHalf: CONEF_SCATTER(c10::Half) break;
    case at::kBFloat16: CONEF_SCATTER(c10::BFloat16) break;
    default: TORCH_CHECK(false, "unsupported table dtype ", table.scalar_type());
  }
#undef CONEF_SCATTER
}

// target[i, :] = fma(alpha, sign[i] * table[bucket[i], :], target[i, :]); returns whether every value of
// target was finite before (the finite check of an update, fused into its first pass): a CSR product with one non-zero
// per row (float32/float64 tables) and torch's mixed-dtype addcmul_ with ``sign * alpha`` (16-bit tables)
// both compute this (``sign * t`` and ``alpha * sign`` are exact: the sign is +-1).
template <typename T, typename I>
bool gather_impl(at::Tensor& target, const at::Tensor& table, const at::Tensor& bucket, const at::Tensor& sign,
                 double alpha) {
  using A = typename Acc<T>::type;
  using Bits = typename std::conditional<std::is_same<A, double>::value, uint64_t, uint32_t>::type;
  const int64_t n = target.size(0), m = target.size(1);
  A* tg = target.data_ptr<A>();
  const T* tab = table.data_ptr<T>();
  const I* bk = bucket.data_ptr<I>();
  const A* sg = sign.data_ptr<A>();
  const A a = static_cast<A>(alpha);
  constexpr bool wide = std::is_same<T, A>::value;
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    std::vector<A> row(wide ? 0 : m);
    Bits bad = 0;  // y - y is +0 for a finite y, NaN otherwise: OR of the bit patterns
    for (int64_t i = i0; i < i1; ++i) {
      A* y = tg + i * m;
      const T* t = tab + static_cast<int64_t>(bk[i]) * m;
      const A as = sg[i] < A(0) ? -a : a;
      const A* w;
      if constexpr (wide) {
        w = reinterpret_cast<const A*>(t);
      } else {
        load_row(t, row.data(), m);
        w = row.data();
      }
      for (int64_t j = 0; j < m; ++j) {
        const A z = y[j] - y[j];
        Bits zb;
        std::memcpy(&zb, &z, sizeof(A));
        bad |= zb;
        y[j] = std::fma(as, w[j], y[j]);
      }
    }
    if (bad != 0) finite.store(false);
  });
  return finite.load();
}

// The same sums as gather_impl, visited bucket by bucket through the CSR of P^T (crow, col = unit,
// val = sign): each bucket row is widened once and stays in registers per column block while the
// units hashed to it are updated (every unit is updated exactly once: the same values).
template <typename T>
bool gather_csr_impl(at::Tensor& target, const at::Tensor& table, const at::Tensor& crow, const at::Tensor& col,
                     const at::Tensor& val, double alpha) {
  using A = typename Acc<T>::type;
  using Bits = typename std::conditional<std::is_same<A, double>::value, uint64_t, uint32_t>::type;
  const int64_t W = table.size(0), m = table.size(1);
  A* tg = target.data_ptr<A>();
  const T* tab = table.data_ptr<T>();
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* cl = col.data_ptr<int32_t>();
  const A* vs = val.data_ptr<A>();
  const A a = static_cast<A>(alpha);
  std::atomic<bool> finite{true};
  at::parallel_for(0, W, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> row(m);
    Bits bad = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t p0 = cr[b], p1 = cr[b + 1];
      if (p1 == p0) continue;
      load_row(tab + b * m, row.data(), m);
      for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
        const int64_t nb = std::min(kBlock, m - j0);
        const A* w = row.data() + j0;
        for (int32_t p = p0; p < p1; ++p) {
          A* y = tg + static_cast<int64_t>(cl[p]) * m + j0;
          const A as = vs[p] < A(0) ? -a : a;
          for (int64_t k = 0; k < nb; ++k) {
            const A z = y[k] - y[k];
            Bits zb;
            std::memcpy(&zb, &z, sizeof(A));
            bad |= zb;
            y[k] = std::fma(as, w[k], y[k]);
          }
        }
      }
    }
    if (bad != 0) finite.store(false);
  });
  return finite.load();
}

bool sketch_gather_add_csr_(at::Tensor target, const at::Tensor& table, const at::Tensor& crow,
                            const at::Tensor& col, const at::Tensor& val, double alpha) {
  check_cpu_contig(target, "target");
  check_cpu_contig(table, "table");
  check_cpu_contig(crow, "crow");
  check_cpu_contig(col, "col");
  check_cpu_contig(val, "val");
  TORCH_CHECK(table.dim() == 2 && target.dim() == 2 && target.size(1) == table.size(1),
              "table (W, m) and target (n, m) expected");
  TORCH_CHECK(crow.scalar_type() == at::kInt && crow.numel() == table.size(0) + 1, "crow: W + 1 int32 expected");
  TORCH_CHECK(col.scalar_type() == at::kInt && col.numel() == target.size(0) && val.numel() == target.size(0),
              "one int32 column and one value per unit");
  const auto acc_t = table.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(target.scalar_type() == acc_t && val.scalar_type() == acc_t, "target and val in the compute dtype");
  TORCH_CHECK(in_range(col, target.size(0)), "col out of range");
  switch (table.scalar_type()) {
    case at::kFloat: return gather_csr_impl<float>(target, table, crow, col, val, alpha);
    case at::kDouble: return gather_csr_impl<double>(target, table, crow, col, val, alpha);
    case at::kHalf: return gather_csr_impl<c10::Half>(target, table, crow, col, val, alpha);
    case at::kBFloat16: return gather_csr_impl<c10::BFloat16>(target, table, crow, col, val, alpha);
    default: TORCH_CHECK(false, "unsupported table dtype ", table.scalar_type());
  }
  return false;
}

bool sketch_gather_add_(at::Tensor target, const at::Tensor& table, const at::Tensor& bucket,
                        const at::Tensor& sign, double alpha) {
  check_cpu_contig(target, "target");
  check_cpu_contig(table, "table");
  check_cpu_contig(bucket, "bucket");
  check_cpu_contig(sign, "sign");
  TORCH_CHECK(table.dim() == 2 && target.dim() == 2 && target.size(1) == table.size(1),
              "table (W, m) and target (n, m) expected");
  TORCH_CHECK(bucket.numel() == target.size(0) && sign.numel() == target.size(0), "one bucket and sign per unit");
  const auto acc_t = table.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(target.scalar_type() == acc_t && sign.scalar_type() == acc_t, "target and sign in the compute dtype");
  TORCH_CHECK(in_range(bucket, table.size(0)), "bucket out of range");
#define CONEF_GATHER(T)                                                           \
  if (bucket.scalar_type() == at::kInt)                                           \
    return gather_impl<T, int32_t>(target, table, bucket, sign, alpha);           \
  else                                                                            \
    return gather_impl<T, int64_t>(target, table, bucket, sign, alpha);
  switch (table.scalar_type()) {
    case at::kFloat: CONEF_GATHER(float)
    case at::kDouble: CONEF_GATHER(double)
    case at::kHalf: CONEF_GATHER(c10::Half)
    case at::kBFloat16: CONEF_GATHER(c10::BFloat16)
    default: TORCH_CHECK(false, "unsupported table dtype ", table.scalar_type());
  }
#undef CONEF_GATHER
  return false;
}

// target[i] += (bit i of signs set ? s : -s)  (bits little-endian within each byte), float32.
void sign_add_(at::Tensor target, const at::Tensor& signs, double s) {
  check_cpu_contig(target, "target");
  check_cpu_contig(signs, "signs");
  TORCH_CHECK(target.scalar_type() == at::kFloat && signs.scalar_type() == at::kByte, "float32 target, uint8 signs");
  const int64_t d = target.numel();
  TORCH_CHECK(signs.numel() == (d + 7) / 8, "signs must hold ceil(d / 8) bytes");
  float* y = target.data_ptr<float>();
  const uint8_t* bits = signs.data_ptr<uint8_t>();
  const float sp = static_cast<float>(s), sn = -sp;
  // +-s of the eight entries of every byte value (8 KiB, in L1): one load and one add per 8 entries
  std::vector<float> lut(256 * 8);
  for (int v = 0; v < 256; ++v)
    for (int k = 0; k < 8; ++k) lut[v * 8 + k] = ((v >> k) & 1) ? sp : sn;
  const float* tl = lut.data();
  const int64_t nbytes = d / 8;
  at::parallel_for(0, nbytes, 8192, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* e = tl + static_cast<int64_t>(bits[c]) * 8;
      float* yy = y + c * 8;
      for (int k = 0; k < 8; ++k) yy[k] = yy[k] + e[k];
    }
  });
  for (int64_t i = nbytes * 8; i < d; ++i) y[i] = y[i] + (((bits[i / 8] >> (i % 8)) & 1u) ? sp : sn);
}

// out[c] = bits of x[8c .. 8c + 7] >= 0 (bit k for x[8c + k]; NaN -> 0, -0.0 -> 1), the bytes of
// ``pack_bits(x >= 0, 1)``; the last partial byte has zeros above the tail.
void sign_pack_(const at::Tensor& x, at::Tensor out) {
  check_cpu_contig(x, "x");
  check_cpu_contig(out, "out");
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kByte, "float32 x, uint8 out");
  const int64_t d = x.numel();
  TORCH_CHECK(out.numel() == (d + 7) / 8, "out must hold ceil(d / 8) bytes");
  const float* xs = x.data_ptr<float>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const int64_t nbytes = d / 8;
  at::parallel_for(0, nbytes, 16384, [&](int64_t c0, int64_t c1) {
    int64_t c = c0;
#ifdef __AVX__
    const __m256 zero = _mm256_setzero_ps();
    for (; c < c1; ++c)
      o[c] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xs + c * 8), zero, _CMP_GE_OQ)));
#endif
    for (; c < c1; ++c) {
      const float* v = xs + c * 8;
      uint8_t b = 0;
      for (int k = 0; k < 8; ++k) b |= static_cast<uint8_t>(v[k] >= 0.0f) << k;
      o[c] = b;
    }
  });
  if (nbytes * 8 < d) {
    uint8_t b = 0;
    for (int64_t i = nbytes * 8; i < d; ++i) b |= static_cast<uint8_t>(xs[i] >= 0.0f) << (i - nbytes * 8);
    o[nbytes] = b;
  }
}

// The tail unit's part of the recovery (x's values past the full units): whether they were finite before,
// then add_ of its bucket's first columns times alpha * tail_sign (CountSketch._add_piece_estimate_'s call).
bool recover_tail(at::Tensor& x, const at::Tensor& table, int64_t full, double alpha, int64_t tail_bucket,
                  double tail_sign) {
  const int64_t m = table.size(1), tail = x.numel() - full * m;
  if (tail <= 0) return true;
  at::Tensor t = x.narrow(0, full * m, tail);
  const bool finite = t.isfinite().all().item<bool>();  // before the estimate is added, as the gather checks
  t.add_(table.select(0, tail_bucket).narrow(0, 0, tail), alpha * tail_sign);
  return finite;
}

// The checks of a whole-vector recovery's operands; returns the tail unit's length.
int64_t check_whole_vector(const at::Tensor& x, const at::Tensor& table, int64_t full, int64_t tail_bucket) {
  check_cpu_contig(x, "x");
  check_cpu_contig(table, "table");
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat, "x: a float32 vector");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == at::kFloat, "table (W, m) float32 expected");
  const int64_t m = table.size(1), d = x.numel();
  TORCH_CHECK(full * m <= d && d - full * m < std::max<int64_t>(m, 1), "x does not match the units");
  const int64_t tail = d - full * m;
  TORCH_CHECK(tail == 0 || (tail_bucket >= 0 && tail_bucket < table.size(0)), "tail_bucket out of range");
  return tail;
}

// x := x + alpha * e_hat for a whole vector (1-D float32) of a one-row float32 sketch, in one call: the full
// units by sketch_gather_add_, the tail unit (x's last d - full*m values) by add_ of its bucket's
// first columns times alpha * tail_sign, as CountSketch.estimate_add_ does. Returns whether every value of x
// was finite before.
bool sketch_recover_(at::Tensor x, const at::Tensor& table, const at::Tensor& ubucket, const at::Tensor& usign,
                     double alpha, int64_t tail_bucket, double tail_sign) {
  const int64_t m = table.size(1), full = ubucket.numel();
  check_whole_vector(x, table, full, tail_bucket);
  bool finite = true;
  if (full > 0) finite = sketch_gather_add_(x.narrow(0, 0, full * m).view({full, m}), table, ubucket, usign, alpha);
  return recover_tail(x, table, full, alpha, tail_bucket, tail_sign) && finite;
}

// One ConEF step with the scaled sign on a one-row float32 count sketch, exactly as the Python path
// computes it (every piece is the kernel or the torch operator that path calls), in one call:
//   x := x + est_alpha * e_hat (full units: sketch_gather_add_; the tail unit: add_), refused when a
//        value of x was not finite (then the table is untouched);
//   scale = float32(||x||_1 / d) (torch's norm), signs = pack(x >= 0) (sign_pack_);
//   table := table * factor + CS(x - Delta) (sketch_scatter_ with the sign bits).
// Returns (finite, scale); the caller makes the payload of (signs, scale).
std::tuple<bool, at::Tensor> conef_sign_step_(at::Tensor x, at::Tensor table, const at::Tensor& ubucket,
                                              const at::Tensor& usign, double est_alpha, const at::Tensor& crow,
                                              const at::Tensor& perm, const at::Tensor& sign,
                                              const at::Tensor& factor, int64_t tail_bucket, double tail_sign,
                                              double tail_factor, at::Tensor signs, bool csr_order) {
  const int64_t m = table.size(1), d = x.numel(), full = ubucket.numel();
  const int64_t tail = check_whole_vector(x, table, full, tail_bucket);
  at::Tensor units = x.narrow(0, 0, full * m).view({full, m});
  // large vectors recover bucket by bucket (the CSR of P^T, as CountSketch's _gather_kernel chooses): the same sums
  const bool finite = csr_order && full > 0
      ? recover_tail(x, table, full, est_alpha, tail_bucket, tail_sign) &
            sketch_gather_add_csr_(units, table, crow, perm, sign, est_alpha)
      : sketch_recover_(x, table, ubucket, usign, est_alpha, tail_bucket, tail_sign);
  c10::optional<at::Tensor> tail_x;
  if (tail > 0) tail_x = x.narrow(0, full * m, tail);
  if (!finite) return std::make_tuple(false, at::Tensor());
  const at::Tensor l1 = at::linalg_vector_norm(x, 1, c10::nullopt, false, at::kFloat);
  const at::Tensor scale = l1.div(std::max<int64_t>(d, 1)).to(at::kFloat).reshape({1});
  sign_pack_(x, signs);
  const double s = -static_cast<double>(scale.item<float>());
  sketch_scatter_(table, units, crow, perm, sign, 1.0, factor, tail_x, tail > 0 ? tail_bucket : 0, tail_sign,
                  tail, tail > 0 ? tail_factor : 1.0, signs, s);
  return std::make_tuple(true, scale);
}

int64_t abi_version() { return 3; }

}  // namespace

TORCH_LIBRARY(conef_native, mod) {
  mod.def("abi_version() -> int", &abi_version);
  mod.def("sketch_scatter_(Tensor(a!) table, Tensor x, Tensor crow, Tensor col, Tensor val, float alpha, "
          "Tensor? factor, Tensor? tail, int tail_bucket, float tail_alpha, int tail_factor_cols, "
          "float tail_factor, Tensor? signs, float s) -> ()", &sketch_scatter_);
  mod.def("sketch_gather_add_(Tensor(a!) target, Tensor table, Tensor bucket, Tensor sign, float alpha) -> bool",
          &sketch_gather_add_);
  mod.def("sketch_gather_add_csr_(Tensor(a!) target, Tensor table, Tensor crow, Tensor col, Tensor val, "
          "float alpha) -> bool", &sketch_gather_add_csr_);
  mod.def("sign_add_(Tensor(a!) target, Tensor signs, float s) -> ()", &sign_add_);
  mod.def("sketch_recover_(Tensor(a!) x, Tensor table, Tensor ubucket, Tensor usign, float alpha, int tail_bucket, "
          "float tail_sign) -> bool", &sketch_recover_);
  mod.def("conef_sign_step_(Tensor(a!) x, Tensor(b!) table, Tensor ubucket, Tensor usign, float est_alpha, "
          "Tensor crow, Tensor perm, Tensor sign, Tensor factor, int tail_bucket, float tail_sign, "
          "float tail_factor, Tensor(c!) signs, bool csr_order) -> (bool, Tensor)", &conef_sign_step_);
  mod.def("sign_pack_(Tensor x, Tensor(a!) out) -> ()", &sign_pack_);
}
