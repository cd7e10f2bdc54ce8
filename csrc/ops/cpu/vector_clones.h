// DCNV2_VECTOR_CLONES compiles a function once per x86-64 level (AVX-512,
// AVX2 + FMA, baseline SSE2) and lets the loader pick the best one for the
// machine (GCC's target_clones), so the channel loops run at the CPU's
// vector width while the extension still runs on any x86-64 CPU. Elsewhere,
// or when built with DCNV2_NO_VECTOR_CLONES defined (setup.py defines it for
// DCNV2_NO_VECTOR_CLONES=1, so that tests can run the baseline code on any
// machine), it is empty: the functions are compiled for the build's target.
// DCNV2_VECTOR_CLONE_TARGETS names the clones, for dcnv2_plugin._C to report.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DCNV2_NO_VECTOR_CLONES)
#define DCNV2_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DCNV2_VECTOR_CLONE_TARGETS "x86-64-v4,x86-64-v3,default"
#else
#define DCNV2_VECTOR_CLONES
#define DCNV2_VECTOR_CLONE_TARGETS ""
#endif
