"""Builds dcnv2_plugin and its compiled operators (dcnv2_plugin._C).

The extension is a CUDAExtension when a GPU is visible or FORCE_CUDA=1 (CI
uses that to compile the CUDA kernels on a machine without a GPU), else a
CppExtension with the CPU kernels only. DCNV2_NO_VECTOR_CLONES=1 compiles
the CPU sampling loops for the build's target only (see
csrc/ops/cpu/vector_clones.h); dcnv2_plugin._C.VECTOR_CLONES says which.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _use_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def _export_requirements():
    """ONNX export and ONNX Runtime, pinned in requirements-export.txt."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements-export.txt")
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def get_extensions():
    # setuptools wants paths relative to this file.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp"))
    # OpenMP makes at::parallel_for multi-threaded inside the kernels.
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    extra_link_args = ["-fopenmp"]
    define_macros = []
    if os.environ.get("DCNV2_NO_VECTOR_CLONES", "0") == "1":
        # The CPU sampling loops for the build's target only, not one clone per
        # x86-64 level (csrc/ops/cpu/vector_clones.h): CI tests that code too.
        define_macros.append(("DCNV2_NO_VECTOR_CLONES", None))
    extension = CppExtension
    if _use_cuda():
        extension = CUDAExtension
        sources += sorted(glob.glob("csrc/ops/cuda/*.cu"))
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    return [
        extension(
            "dcnv2_plugin._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(
    name="dcnv2_plugin",
    version="0.1.0",
    description="Deformable ConvNets v2 for Detectron2: modulated deformable convolution and RoI pooling",
    packages=find_packages(include=("dcnv2_plugin", "dcnv2_plugin.*")),
    # The configs ship with the package (dcnv2_plugin/configs links to the
    # repository's configs/), found by name through dcnv2_plugin.model_zoo.
    package_data={"dcnv2_plugin": ["configs/*.yaml", "configs/**/*.yaml"]},
    python_requires=">=3.10",
    # The operators need torch alone; the detectron2 components need
    # detectron2 (not on the package index: see the README), which brings
    # fvcore and pycocotools.
    install_requires=["torch", "torchvision"],
    extras_require={
        # The embedded shapes dataset (dcnv2_plugin.data).
        "data": ["opencv-python-headless", "pycocotools"],
        # ONNX export (dcnv2_plugin.export) and ONNX Runtime.
        "export": _export_requirements(),
        # The benchmarks' peers: ONNX Runtime and the exporter.
        "bench": _export_requirements(),
    },
    entry_points={"console_scripts": ["dcnv2-train-net = dcnv2_plugin.engine:run"]},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
