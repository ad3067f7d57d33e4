// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "bench/report.h"

#include <cstdio>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace kvcache::bench {
namespace {

TEST(BenchReport, TableAlignsColumns) {
  Report r({"op", "n", "median_us"});
  r.add_row({std::string("step"), int64_t{1024}, 12.5});
  r.add_row({std::string("match_prefix"), int64_t{4096}, 3.25});
  EXPECT_EQ(r.table(),
            "op            n     median_us\n"
            "step          1024  12.5\n"
            "match_prefix  4096  3.25\n");
}

TEST(BenchReport, JsonHasOneObjectPerRowAndEscapes) {
  Report r({"op", "n", "x"});
  r.add_row({std::string("a\"b\\c\n"), int64_t{-3}, 0.5});
  r.add_row({std::string("inf"), int64_t{0}, 1.0 / 0.0});
  EXPECT_EQ(r.json(),
            "[\n"
            "  {\"op\": \"a\\\"b\\\\c\\n\", \"n\": -3, \"x\": 0.5},\n"
            "  {\"op\": \"inf\", \"n\": 0, \"x\": null}\n"
            "]\n");
}

TEST(BenchReport, WriteJsonRoundTripsAndReportsBadPaths) {
  Report r({"op"});
  r.add_row({std::string("x")});
  const std::string path = ::testing::TempDir() + "kvcache_bench_report.json";
  ASSERT_OK(r.write_json(path));
  std::ifstream f(path);
  std::stringstream text;
  text << f.rdbuf();
  EXPECT_EQ(text.str(), r.json());
  std::remove(path.c_str());
  EXPECT_TRUE(testing::has_error(r.write_json("/nonexistent-dir/x.json"), Code::unavailable,
                                 "bench: cannot write '/nonexistent-dir/x.json'"));
}

TEST(BenchReport, Median) {
  std::vector<double> odd = {5, 1, 3};
  EXPECT_EQ(median(odd), 3);
  std::vector<double> even = {4, 1, 3, 2};
  EXPECT_EQ(median(even), 2.5);
  std::vector<double> one = {7};
  EXPECT_EQ(median(one), 7);
}

}  // namespace
}  // namespace kvcache::bench
