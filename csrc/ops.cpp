// Schemas of the raw kernels. They carry no autograd: the Python layer
// (coopseg_kernels/ops/*.py) wraps them in torch.library custom ops with fake
// and autograd registrations, and routes CUDA tensors to the Triton kernels.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import coopseg_kernels._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(coopseg, m) {
  // mode: "bilinear" | "nearest"; padding_mode: "zeros" | "border" | "reflection"
  m.def("warp_fwd(Tensor moving, Tensor coarse, bool align_corners, str padding_mode, str mode) -> Tensor");
  m.def(
      "warp_bwd(Tensor grad_out, Tensor moving, Tensor coarse, bool align_corners, str padding_mode, str mode, "
      "bool need_moving, bool need_coarse) -> (Tensor, Tensor)");
  // warp by a full-resolution displacement field (coarse size == image size): coopseg_kernels/ops/warp_dense.py
  m.def("warp_dense_fwd(Tensor moving, Tensor ddf, str padding_mode, str mode) -> Tensor");
  m.def(
      "warp_dense_bwd(Tensor grad_out, Tensor moving, Tensor ddf, str padding_mode, str mode, bool need_moving, "
      "bool need_ddf) -> (Tensor, Tensor)");
  // cubic B-spline control grid (upsample="bspline"): control point j of axis k at origin[k] + j * spacing[k]
  // voxels; coopseg_kernels/ops/warp_bspline.py
  m.def(
      "warp_bspline_fwd(Tensor moving, Tensor coarse, float[] origin, float[] spacing, str padding_mode, str mode) "
      "-> Tensor");
  m.def(
      "warp_bspline_bwd(Tensor grad_out, Tensor moving, Tensor coarse, float[] origin, float[] spacing, "
      "str padding_mode, str mode, bool need_moving, bool need_coarse) -> (Tensor, Tensor)");
  m.def("upsample_bspline_fwd(Tensor coarse, int[] size, float[] origin, float[] spacing) -> Tensor");
  m.def("upsample_bspline_bwd(Tensor grad_field, int[] coarse_size, float[] origin, float[] spacing) -> Tensor");
  m.def("upsample_field_fwd(Tensor coarse, int[] size, bool align_corners) -> Tensor");
  m.def("upsample_field_bwd(Tensor grad_field, int[] coarse_size, bool align_corners) -> Tensor");
  // separable banded operator: the blur and its adjoint (tables from coopseg_kernels/ops/blur.py)
  m.def("blur_apply(Tensor x, Tensor[] idx, Tensor[] wt) -> Tensor");
  // the exact translation search's direct counter: masks packed 64 voxels a word, and the
  // overlap / in-volume size of s1 for a box of crop offsets (coopseg_kernels/similarity/translation.py)
  m.def("pack_bits(Tensor mask) -> Tensor");
  m.def(
      "overlap_counts(Tensor packed_a, Tensor packed_b, int a_bits, int b_bits, int[] d_lo, int[] d_n, "
      "int[] box_lo, int[] box_len) -> (Tensor, Tensor)");
  // one D_S optimizer step: per-item loss mean((tau(s1b) - s2b)^2) and its gradient w.r.t. tau
  m.def(
      "similarity_step_fwd(Tensor s1_blurred, Tensor s2_blurred, Tensor coarse, bool align_corners) "
      "-> (Tensor, Tensor)");
}
