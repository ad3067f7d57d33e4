// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// `kvcache bench ops --quick`: every row has the documented keys and self-consistent numbers.

#include "bench/ops_bench.h"

#include <set>
#include <string>
#include <variant>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace kvcache::bench {
namespace {

TEST(OpsBench, QuickRunCoversEveryOpWithConsistentRows) {
  OpsBenchOptions options;
  options.quick = true;
  options.repeats = 1;
  options.threads = 2;
  Result<Report> report = run_ops_bench(options);
  ASSERT_OK(report);
  const std::vector<std::string> keys = {"op",         "shape",     "dtype", "sku",
                                         "timing",     "median_us", "gbps",  "bound_gbps",
                                         "bound_kind", "fraction"};
  ASSERT_EQ(report->columns(), keys);
  std::set<std::string> ops;
  for (const auto& row : report->rows()) {
    const auto& op = std::get<std::string>(row[0]);
    ops.insert(op);
    SCOPED_TRACE(op + " " + std::get<std::string>(row[1]));
    EXPECT_FALSE(std::get<std::string>(row[3]).empty());
    EXPECT_EQ(std::get<std::string>(row[4]), "wall");
    const double us = std::get<double>(row[5]);
    const double gbps = std::get<double>(row[6]);
    const double bound = std::get<double>(row[7]);
    const auto& kind = std::get<std::string>(row[8]);
    EXPECT_GT(us, 0.0);
    EXPECT_GT(gbps, 0.0);
    EXPECT_GT(bound, 0.0);
    EXPECT_TRUE(kind == "read" || kind == "copy");
    EXPECT_EQ(kind == "read", op.find("attention") != std::string::npos);
    EXPECT_DOUBLE_EQ(std::get<double>(row[9]), gbps / bound);
  }
  EXPECT_EQ(ops,
            (std::set<std::string>{"decode_attention", "extend_attention", "kv_append",
                                   "paged_append", "qkv_rope_write", "copy_pages", "rope_shift"}));
}

TEST(OpsBench, RefusesBadOptionsAndAMissingGpu) {
  OpsBenchOptions options;
  options.repeats = 0;
  EXPECT_TRUE(testing::has_error(run_ops_bench(options), Code::invalid_argument, "repeats"));
  options.repeats = 1;
  options.device = Device::cuda(cuda_device_count());  // one past the last GPU (cuda:0 in CI)
  EXPECT_TRUE(testing::has_error(run_ops_bench(options), Code::unavailable, "not a GPU"));
}

}  // namespace
}  // namespace kvcache::bench
