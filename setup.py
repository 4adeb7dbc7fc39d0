"""Builds coopseg_kernels._C, the C++/OpenMP CPU kernels, with torch's cpp_extension.

The Triton (GPU) kernels are plain Python and need no build step. Set
COOPSEG_NO_EXT=1 to install without the extension (CPU ops then fall back to the
reference with a warning).
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("COOPSEG_NO_EXT") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -fopenmp matters: at::parallel_for is an inline template that only runs in
    # parallel when this translation unit is compiled with OpenMP.
    # The sources are C++17; the standard flag is left to torch (C++20 since 2.10).
    # -fno-trapping-math: the kernels never test floating-point exception flags;
    # without it GCC may not if-convert float compares and conversions and leaves
    # the warp's tap loops scalar (4x slower; docs/kernels.md#build-flags).
    # NaN and inf semantics are unchanged (unlike -ffast-math).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("COOPSEG_NATIVE", "1") == "1":
        flags.append("-march=native")
    link = ["-fopenmp"]
    if os.environ.get("COOPSEG_SANITIZE") == "1":
        # make sanitize: ASan + UBSan; -fno-wrapv comes last to undo Python's
        # -fwrapv, which would hide signed overflow from UBSan
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        # the same -march as the optimised build, so that the code paths it takes
        # (the warp's AVX-512 rows with -march=native on AVX-512) are the ones checked
        flags = ["-O1", "-g", "-fopenmp", "-fno-math-errno"] + san + ["-fno-wrapv"]
        if os.environ.get("COOPSEG_NATIVE", "1") == "1":
            flags.append("-march=native")
        link += san
    ext_modules = [
        CppExtension(
            "coopseg_kernels._C",
            sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
            include_dirs=[os.path.abspath("csrc/cpu")],
            extra_compile_args={"cxx": flags},
            extra_link_args=link,
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="coopseg",
    version="0.1.0",
    description="Fused kernels and a thin training layer for cooperating segmentation/registration networks",
    packages=find_packages(include=["coopseg_kernels*", "coopseg*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton"],
        # real volumes: NIfTI, resampling, CHAOS DICOM/PNG import, progress bars, figures
        "io": ["nibabel", "scipy", "pydicom", "pillow", "tqdm", "matplotlib"],
        "toy": ["matplotlib"],  # coopseg toy's box plot
        "demo": ["nibabel", "scipy", "tqdm", "matplotlib", "nilearn"],  # MNI152 templates (coopseg demo-data)
        "augment": ["torchio"],  # coopseg.transforms: TorchIO's elastic deformation on the fused warp
        # monai / voxelmorph: tests/test_nn.py checks coopseg_kernels.nn against their own modules
        "test": ["pytest", "pytest-benchmark", "scipy", "triton", "nibabel", "pydicom", "pillow", "tqdm",
                 "matplotlib", "monai", "voxelmorph==0.3.4",
                 # SimpleITK / torchio: tests/test_bspline_sitk.py and tests/test_transforms.py
                 "SimpleITK", "torchio"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["coopseg=coopseg.cli:main"]},
)
