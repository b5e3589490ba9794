// r7b_fast._merge: Python bindings of the streaming merge engine (engine.h has the contract).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "engine.h"

namespace py = pybind11;
using r7b::Engine;
using r7b::Task;

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
  d["simd_available"] = r7b::available_simd();
#ifdef R7B_HAVE_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["compiler"] = std::string(__VERSION__);
  return d;
}

// A task as Python sends it: (name, kind, out_file, out_off, out_dt, numel, src_files, src_offs,
// in_dt, coefs), optionally followed by the method tuple (method, sparsify, consensus, rescale,
// normalize, divisor, densities, keys, rows, t) of a TIES / DARE / SLERP merge.
using TaskTuple = std::tuple<std::string, int, int, int64_t, int, int64_t, std::vector<int>,
                             std::vector<int64_t>, int, std::vector<float>>;
using MethodTuple = std::tuple<int, int, bool, bool, bool, float, std::vector<double>, std::vector<uint64_t>,
                               int64_t, double>;

static Engine* make_engine(std::vector<std::string> inputs, std::vector<std::string> outputs,
                           const std::vector<py::tuple>& tasks, int threads, int64_t chunk_bytes,
                           const std::string& simd) {
  std::vector<Task> ts;
  ts.reserve(tasks.size());
  for (const auto& tup : tasks) {
    if (tup.size() != 10 && tup.size() != 11) throw py::value_error("a task is a tuple of 10 or 11 items");
    Task k;
    py::tuple head(10);
    for (size_t i = 0; i < 10; ++i) head[i] = tup[i];
    std::tie(k.name, k.kind, k.out_file, k.out_off, k.out_dt, k.numel, k.src_file, k.src_off, k.in_dt, k.coef) =
        head.cast<TaskTuple>();
    if (tup.size() == 11)
      std::tie(k.method, k.sparsify, k.consensus, k.rescale, k.normalize, k.divisor, k.density, k.key, k.rows, k.t) =
          tup[10].cast<MethodTuple>();
    ts.push_back(std::move(k));
  }
  return new Engine(std::move(inputs), std::move(outputs), std::move(ts), threads, chunk_bytes, simd);
}

PYBIND11_MODULE(_merge, m) {
  m.doc() = "r7b-fast merge engine (C++): executes a merge plan made by r7b_fast.merge";
  py::register_exception<r7b::IoError>(m, "MergeIOError", PyExc_OSError);
  py::register_exception<r7b::DataError>(m, "MergeDataError", PyExc_ValueError);
  m.def("build_info", &build_info, "How this module was built: SIMD paths compiled in / usable here, compiler.");
  m.def("available_simd", &r7b::available_simd, "SIMD paths compiled in and supported by this CPU.");
  m.def("choose_simd", &r7b::choose_simd, py::arg("request") = "auto",
        "The path a merge would use for `request` (auto honours R7B_MERGE_SIMD).");
  m.attr("F32") = int(r7b::kF32);
  m.attr("F16") = int(r7b::kF16);
  m.attr("BF16") = int(r7b::kBF16);
  m.attr("MERGE") = int(r7b::kMerge);
  m.attr("COPY") = int(r7b::kCopy);
  m.attr("LINEAR") = int(r7b::kLinear);
  m.attr("GTA") = int(r7b::kGta);
  m.attr("SLERP") = int(r7b::kSlerp);
  m.attr("KEEP_ALL") = int(r7b::kKeepAll);
  m.attr("MAGNITUDE") = int(r7b::kMagnitude);
  m.attr("RANDOM") = int(r7b::kRandom);
  py::class_<Engine>(m, "Engine")
      .def(py::init(&make_engine), py::arg("inputs"), py::arg("outputs"), py::arg("tasks"), py::arg("threads") = 2,
           py::arg("chunk_bytes") = 2 << 20, py::arg("simd") = "auto")
      .def("run", &Engine::run, py::call_guard<py::gil_scoped_release>(),
           "Execute the plan (GIL released); raises OSError (MergeIOError) naming the file on I/O failure.")
      .def("cancel", &Engine::cancel, "Ask a running merge to stop; run() then raises RuntimeError.")
      .def_property_readonly("done_bytes", &Engine::done_bytes, "Output bytes written so far.")
      .def_property_readonly("total_bytes", &Engine::total_bytes, "Output bytes the plan writes.")
      .def_property_readonly("simd", &Engine::simd)
      .def_property_readonly("threads", &Engine::threads);
}
