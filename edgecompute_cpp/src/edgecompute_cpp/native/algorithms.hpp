// What the bundled plugin's source files share: the algorithms that live in a file of their own.
#ifndef EDGECOMPUTE_BUILTIN_ALGORITHMS_HPP
#define EDGECOMPUTE_BUILTIN_ALGORITHMS_HPP

#include <edgecompute/plugin.hpp>

namespace builtin {

// fft.cpp: discrete Fourier transform along the last axis (= numpy.fft.fft / ifft)
void run_fft(const ec::Inputs& in, const ec::Params& params, ec_result* r);

}  // namespace builtin

#endif  // EDGECOMPUTE_BUILTIN_ALGORITHMS_HPP
