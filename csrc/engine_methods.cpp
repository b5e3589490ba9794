// TIES / DARE / SLERP in the merge engine: the per-tensor passes that run before the chunk
// pipeline (magnitude thresholds, L1 rescale factors, per-row SLERP coefficients) and the
// per-chunk dispatch to the element kernels. Memory: each prepare thread holds two chunk-sized
// fp32 buffers; a TIES trim needs one fp32 copy of |tau| of the whole tensor, and that buffer
// is shared (one trim at a time, under scratch_mu_), so the engine holds at most one fp32 copy
// of its largest trimmed tensor, whatever the thread count, never the model.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <thread>

#include "engine.h"

namespace r7b {

void check_method(const Task& k) {
  if (k.kind != kMerge || k.method == kLinear) return;
  const size_t ns = k.src_file.size();
  const std::string where = "task '" + k.name + "': ";
  if (k.method == kGta) {
    if (ns < 2) throw std::invalid_argument(where + "TIES/DARE needs a base and at least one expert");
    if (k.sparsify < kKeepAll || k.sparsify > kRandom) throw std::invalid_argument(where + "bad sparsify");
    if (k.density.size() != ns || (k.sparsify == kRandom && k.key.size() != ns))
      throw std::invalid_argument(where + "one density (and DARE key) per source");
    for (size_t j = 1; j < ns; ++j)
      if (!(k.density[j] > 0.0 && k.density[j] <= 1.0)) throw std::invalid_argument(where + "density must be in (0, 1]");
    if (!(std::isfinite(k.divisor) && k.divisor != 0.0f)) throw std::invalid_argument(where + "bad divisor");
  } else if (k.method == kSlerp) {
    if (ns != 2) throw std::invalid_argument(where + "SLERP needs exactly two sources");
    if (!(k.t >= 0.0 && k.t <= 1.0)) throw std::invalid_argument(where + "t must be in [0, 1]");
    if (k.rows < 1 || (k.numel > 0 && k.numel % k.rows)) throw std::invalid_argument(where + "bad row count");
  } else {
    throw std::invalid_argument(where + "bad method");
  }
}

void Engine::read_floats(const Task& k, size_t j, int64_t begin, int64_t count, std::vector<char>& raw,
                         float* dst) {
  const int64_t isz = dtype_size(k.in_dt);
  const int f = k.src_file[j];
  raw.resize(size_t(count * isz));
  pread_full(in_fd_[f], raw.data(), count * isz, k.src_off[j] + begin * isz, inputs_[f]);
  for (int64_t i = 0; i < count; ++i) dst[i] = load_one(raw.data(), k.in_dt, size_t(i));
}

// TIES trim: keep the k = max(1, int(density * numel)) largest |tau| (trim_magnitude order),
// ties at the threshold broken by lower element index. One pass fills `scratch` with |tau| and
// nth_element finds the k-th largest value `thr`; a second (streamed) pass finds the index
// `cut` below which threshold-equal elements are kept, and the L1 sums for `rescale`.
void Engine::prepare_gta(Task& k) {
  const size_t ns = k.src_file.size();
  const int64_t n = k.numel, step = std::max<int64_t>(1, chunk_bytes_ / 4);
  k.dthr.assign(ns, 16777216.0);
  for (size_t j = 1; j < ns; ++j) k.dthr[j] = k.density[j] * 16777216.0;
  k.dbound.assign(ns, 0);
  for (size_t j = 0; j < ns; ++j) k.dbound[j] = uint32_t(std::ceil(k.dthr[j]));
  k.thr.assign(ns, -INFINITY);
  k.cut.assign(ns, n);
  k.scale.assign(ns, 1.0f);
  std::vector<float> fa(size_t(std::min(step, std::max<int64_t>(n, 1)))), fb(fa.size());
  std::vector<char> raw;
  for (size_t j = 1; j < ns && !abort_.load(); ++j) {
    if (n == 0 || k.sparsify == kKeepAll || k.density[j] >= 1.0) continue;
    if (k.sparsify == kRandom && !k.rescale) continue;  // the drop mask needs no statistics
    int64_t need = 0;  // threshold-equal elements still to keep
    if (k.sparsify == kMagnitude) {
      std::lock_guard<std::mutex> hold(scratch_mu_);
      std::vector<float>& scratch = scratch_;
      const int64_t kk = std::max<int64_t>(1, int64_t(k.density[j] * double(n)));
      scratch.resize(size_t(n));
      for (int64_t b = 0; b < n; b += step) {
        const int64_t c = std::min(step, n - b);
        read_floats(k, 0, b, c, raw, fa.data());
        read_floats(k, j, b, c, raw, fb.data());
        for (int64_t i = 0; i < c; ++i) scratch[size_t(b + i)] = trim_magnitude(fb[i] - fa[i]);
      }
      std::nth_element(scratch.begin(), scratch.begin() + (kk - 1), scratch.end(), std::greater<float>());
      k.thr[j] = scratch[size_t(kk - 1)];
      const int64_t above = std::count_if(scratch.begin(), scratch.end(), [&](float m) { return m > k.thr[j]; });
      need = kk - above;
    }
    // locals, so the compiler keeps the sums in registers (the loop is latency-bound on them)
    double before = 0.0, after = 0.0;
    const float thr = k.thr[j];
    const uint64_t key = k.sparsify == kRandom ? k.key[j] : 0;
    const double dthr = k.dthr[j];
    const bool magnitude = k.sparsify == kMagnitude;
    for (int64_t b = 0; b < n && !abort_.load(); b += step) {
      const int64_t c = std::min(step, n - b);
      read_floats(k, 0, b, c, raw, fa.data());
      read_floats(k, j, b, c, raw, fb.data());
      for (int64_t i = 0; i < c; ++i) {
        const float tau = fb[i] - fa[i];
        bool keep;
        if (magnitude) {
          const float m = trim_magnitude(tau);
          keep = m > thr;
          if (m == thr && need > 0) {
            keep = true;
            if (--need == 0) k.cut[j] = b + i + 1;
          }
        } else {
          keep = double(dare_draw(key, b + i)) < dthr;
        }
        const double a = std::fabs(double(tau));
        before += a;
        after += keep ? a : 0.0;
      }
      if (!k.rescale && magnitude && need == 0) break;  // cut found, no sums needed
    }
    // mergekit's rescaled_masked_tensor: no rescale when either L1 norm is below 1e-7
    if (k.rescale && before >= 1e-7 && after >= 1e-7) k.scale[j] = float(before / after);
  }
}

// SLERP coefficients of one row from its sums (fp64): mergekit's slerp with its constants
// (norms below 1e-8 count as 1; |cos| > 0.9995 falls back to linear interpolation).
static void slerp_coef(double sxx, double syy, double sxy, double t, float* out) {
  double na = std::sqrt(sxx), nb = std::sqrt(syy);
  if (!(na > 1e-8)) na = 1.0;
  if (!(nb > 1e-8)) nb = 1.0;
  double dot = sxy / (na * nb);
  if (dot > 1.0) dot = 1.0;
  if (dot < -1.0) dot = -1.0;
  if (std::fabs(dot) > 0.9995) {
    out[0] = float(1.0 - t);
    out[1] = float(t);
    return;
  }
  const double theta = std::acos(dot), s = std::sin(theta);
  out[0] = float(std::sin((1.0 - t) * theta) / s);
  out[1] = float(std::sin(t * theta) / s);
}

// Per row (rows of numel / rows elements): sum x^2, y^2, xy in fp64, in element order, then
// the row's (base, other) coefficients.
void Engine::prepare_slerp(Task& k) {
  const int64_t n = k.numel, step = std::max<int64_t>(1, chunk_bytes_ / 4);
  const int64_t len = n > 0 ? n / k.rows : 1;
  std::vector<double> sums(size_t(k.rows) * 3, 0.0);
  std::vector<float> fa(size_t(std::min(step, std::max<int64_t>(n, 1)))), fb(fa.size());
  std::vector<char> raw;
  for (int64_t b = 0; b < n && !abort_.load(); b += step) {
    const int64_t c = std::min(step, n - b);
    read_floats(k, 0, b, c, raw, fa.data());
    read_floats(k, 1, b, c, raw, fb.data());
    for (int64_t i = 0; i < c; ++i) {
      double* r = &sums[size_t((b + i) / len) * 3];
      const double x = fa[i], y = fb[i];
      r[0] += x * x;  // exact products: 24-bit mantissas
      r[1] += y * y;
      r[2] += x * y;
    }
  }
  k.row_coef.assign(size_t(k.rows) * 2, 0.0f);
  for (int64_t r = 0; r < k.rows; ++r)
    slerp_coef(sums[size_t(r) * 3], sums[size_t(r) * 3 + 1], sums[size_t(r) * 3 + 2], k.t, &k.row_coef[size_t(r) * 2]);
}

void Engine::prepare_task(Task& k) {
  if (k.method == kGta)
    prepare_gta(k);
  else if (k.method == kSlerp)
    prepare_slerp(k);
}

void Engine::prepare() {
  std::vector<size_t> todo;
  for (size_t t = 0; t < tasks_.size(); ++t)
    if (tasks_[t].kind == kMerge && tasks_[t].method != kLinear) todo.push_back(t);
  if (todo.empty()) return;
  std::atomic<size_t> next{0};
  auto work = [&] {
    try {
      for (size_t i; (i = next.fetch_add(1)) < todo.size() && !abort_.load();) prepare_task(tasks_[todo[i]]);
    } catch (...) {
      fail(std::current_exception());
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < std::min<int>(threads_, int(todo.size())); ++t) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
  std::vector<float>().swap(scratch_);  // released before the chunk pipeline allocates
}

void Engine::compute_method(const Task& k, const Chunk& c, const void* const* src, char* dst) {
  const size_t ns = k.src_file.size();
  const int64_t isz = dtype_size(k.in_dt), osz = dtype_size(k.out_dt);
  if (k.method == kGta) {
    gta_(GtaBlock{src, k.coef.data(), int(ns), k.in_dt, k.out_dt, size_t(c.count), c.begin, dst, k.sparsify,
                  k.consensus, k.rescale, k.normalize, k.divisor, k.thr.data(), k.cut.data(), k.scale.data(),
                  k.dbound.data(), k.key.data()});
    return;
  }
  // SLERP: each row segment of the chunk is a two-source linear combination with its row's
  // coefficients (the linear kernel, so the SIMD paths agree bit for bit)
  const int64_t len = k.numel / k.rows;
  for (int64_t i = 0; i < c.count;) {
    const int64_t gi = c.begin + i, r = gi / len;
    const int64_t m = std::min(c.count - i, (r + 1) * len - gi);
    const void* seg[2] = {static_cast<const char*>(src[0]) + i * isz, static_cast<const char*>(src[1]) + i * isz};
    kernel_(Block{seg, &k.row_coef[size_t(r) * 2], 2, k.in_dt, k.out_dt, size_t(m), dst + i * osz});
    i += m;
  }
}

}  // namespace r7b
