// r7b_fast._merge: the C++ merge engine. Until the streaming engine lands this module only
// reports how it was built (which SIMD paths were compiled in, OpenMP).
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

static py::dict build_info() {
  py::dict d;
  py::list simd;
  simd.append("scalar");
#ifdef R7B_HAVE_AVX2
  simd.append("avx2");
#endif
#ifdef R7B_HAVE_AVX512
  simd.append("avx512");
#endif
  d["simd_paths"] = simd;
#ifdef R7B_HAVE_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["compiler"] = std::string(__VERSION__);
  return d;
}

PYBIND11_MODULE(_merge, m) {
  m.doc() = "r7b-fast merge engine (C++)";
  m.def("build_info", &build_info, "How this module was built: SIMD paths compiled in, OpenMP, compiler.");
}
