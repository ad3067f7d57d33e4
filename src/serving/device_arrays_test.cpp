// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// DeviceArrays: no copy on the CPU; on CUDA a staged array and a downloaded result round-trip
// (skipped without a GPU); an unavailable device is an error, not a crash.
#include "serving/device_arrays.h"

#include <cstdint>
#include <numeric>
#include <vector>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace kvcache::serving {
namespace {

using ::kvcache::testing::has_error;

TEST(DeviceArrays, CpuUsesTheHostArraysThemselves) {
  DeviceArrays dev(Device::cpu());
  const std::vector<int32_t> host = {3, 1, 4, 1, 5};
  Result<std::span<const int32_t>> staged = dev.stage(host);
  ASSERT_OK(staged);
  EXPECT_EQ(staged->data(), host.data());
  EXPECT_EQ(staged->size(), host.size());
  std::vector<float> out(7);
  Result<float*> at = dev.output_for(std::span(out));
  ASSERT_OK(at);
  EXPECT_EQ(*at, out.data());
  EXPECT_OK(dev.download(std::span(out), *at));
}

TEST(DeviceArrays, CudaRoundTrip) {
  if (cuda_device_count() == 0) {
    DeviceArrays dev(Device::cuda(0));
    const std::vector<int64_t> host = {1, 2};
    EXPECT_TRUE(has_error(dev.stage(host), Code::unavailable));
    GTEST_SKIP() << "no CUDA device: only the refusal is checked";
  }
  DeviceArrays dev(Device::cuda(0));
  // More than one block in a step, then a reset that merges them: every array stays intact.
  for (int step = 0; step < 2; ++step) {
    dev.reset();
    std::vector<std::vector<int64_t>> hosts;
    std::vector<std::span<const int64_t>> staged;
    for (int i = 0; i < 4; ++i) {
      hosts.emplace_back(size_t{20000} * static_cast<size_t>(i + 1));
      std::iota(hosts.back().begin(), hosts.back().end(), int64_t{i} * 1000000);
      Result<std::span<const int64_t>> s = dev.stage(hosts.back());
      ASSERT_OK(s);
      EXPECT_NE(s->data(), hosts.back().data());
      staged.push_back(*s);
    }
    for (size_t i = 0; i < hosts.size(); ++i) {
      std::vector<int64_t> back(hosts[i].size(), -1);
      ASSERT_OK(dev.download(std::span(back), staged[i].data()));
      EXPECT_EQ(back, hosts[i]) << "array " << i << " of step " << step;
    }
  }
}

}  // namespace
}  // namespace kvcache::serving
