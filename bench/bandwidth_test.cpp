// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The bandwidth probe: refuses bad options, and one probe measures both bounds again and again.

#include "bench/bandwidth.h"

#include <cmath>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace kvcache::bench {
namespace {

TEST(BandwidthProbe, RefusesTinyBuffersAndZeroPasses) {
  ThreadPool pool(2);
  BandwidthOptions options;
  options.bytes = (int64_t{1} << 20) - 1;
  EXPECT_TRUE(testing::has_error(BandwidthProbe::create(pool, options), Code::invalid_argument,
                                 "BandwidthProbe.create: bytes < 1 MiB"));
  options.bytes = int64_t{1} << 20;
  options.passes = 0;
  EXPECT_TRUE(testing::has_error(BandwidthProbe::create(pool, options), Code::invalid_argument,
                                 "passes < 1"));
}

TEST(BandwidthProbe, MeasuresBothBoundsRepeatedlyFromOneProbe) {
  ThreadPool pool(2);
  BandwidthOptions options;
  options.bytes = (int64_t{4} << 20) + 4096 + 100;  // a last share longer than the others
  options.passes = 2;
  Result<BandwidthProbe> probe = BandwidthProbe::create(pool, options);
  ASSERT_OK(probe);
  for (int round = 0; round < 3; ++round) {
    const double read = probe->read_gbps();
    const double copy = probe->copy_gbps();
    EXPECT_TRUE(std::isfinite(read) && read > 0.0) << read;
    EXPECT_TRUE(std::isfinite(copy) && copy > 0.0) << copy;
  }
}

}  // namespace
}  // namespace kvcache::bench
