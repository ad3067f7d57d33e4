// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The demo's outputs over a hand-made report: the JSON keys docs/CLI.md promises, totals over the
// int8 / fp8 reruns, pass / fail, and the SVG's parts.
#include "serving/report.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "serving/svg_plot.h"

namespace kvcache::serving {
namespace {

EngineReport sample_report() {
  EngineReport r;
  r.conversations = 2;
  r.requests = 5;
  r.forks = 1;
  r.steps = 3;
  r.tokens_prefilled = 30;
  r.tokens_reused = 10;
  r.hit_rate = 0.25;
  r.budget_pages = 8;
  r.peak_pages = 8;
  r.contiguous_pages_needed = 12;
  r.evictions = 4;
  r.cow_copies = 1;
  r.preemptions = 2;
  r.tokens_per_second = 1234.5;
  r.checks = 40;
  r.verified_requests = 5;
  r.max_error = 1e-3f;
  r.tolerance = 8e-3f;
  r.timeline = {{0, 2, 0, 6, 0.0, 0}, {1, 8, 0, 0, 0.1, 1}, {2, 3, 5, 0, 0.25, 2}};
  return r;
}

std::vector<StorageError> sample_storage() {
  return {{DType::int8, 1e-2f, 6e-2f, 20, 0}, {DType::fp8_e4m3, 3e-2f, 2e-1f, 20, 0}};
}

// The value text of top-level key `key` (a line of its own, indented 2) up to the next comma or
// newline.
std::string json_value(const std::string& json, const std::string& key) {
  const std::string line = "\n  \"" + key + "\": ";
  const size_t at = json.find(line);
  if (at == std::string::npos) return "<missing>";
  const size_t begin = at + line.size();
  return json.substr(begin, json.find_first_of(",\n", begin) - begin);
}

TEST(Report, JsonHasTheDocumentedKeys) {
  const std::string json = summary_json(sample_report(), EngineOptions{}, sample_storage());
  EXPECT_EQ(json.front(), '{');
  EXPECT_EQ(json.substr(json.size() - 2), "}\n");
  EXPECT_EQ(json_value(json, "hit_rate"), "0.25");
  EXPECT_EQ(json_value(json, "evictions"), "4");
  EXPECT_EQ(json_value(json, "preemptions"), "2");
  EXPECT_EQ(json_value(json, "cow_copies"), "1");
  EXPECT_EQ(json_value(json, "peak_pages"), "8");
  EXPECT_EQ(json_value(json, "contiguous_pages_needed"), "12");
  EXPECT_EQ(json_value(json, "tokens_per_second"), "1234.5");
  EXPECT_EQ(json_value(json, "checks"), "80");  // 40 + 20 + 20
  EXPECT_EQ(json_value(json, "mismatches"), "0");
  EXPECT_EQ(json_value(json, "passed"), "true");
  EXPECT_NE(json.find("{\"kv_dtype\": \"int8\", \"max_error\": 0.01, \"tolerance\": 0.06, "
                      "\"checks\": 20, \"mismatches\": 0}"),
            std::string::npos)
      << json;
}

TEST(Report, MismatchesAnywhereFailTheRun) {
  EngineReport r = sample_report();
  std::vector<StorageError> storage = sample_storage();
  EXPECT_TRUE(passed(r, storage));
  storage[1].mismatches = 3;  // only the fp8 rerun
  EXPECT_FALSE(passed(r, storage));
  EXPECT_EQ(total_mismatches(r, storage), 3);
  EXPECT_EQ(json_value(summary_json(r, EngineOptions{}, storage), "passed"), "false");
  storage[1].mismatches = 0;
  r.leaked_pages = 1;
  EXPECT_FALSE(passed(r, storage));
  r.leaked_pages = 0;
  r.checks = 0;  // nothing compared is not a pass
  EXPECT_FALSE(passed(r, storage));
}

TEST(Report, NonFiniteErrorIsNull) {
  EngineReport r = sample_report();
  r.max_error = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(json_value(summary_json(r, EngineOptions{}, {}), "max_error"), "null");
}

TEST(Report, TableNamesWhatTheCacheDid) {
  const std::string table = summary_table(sample_report(), EngineOptions{}, sample_storage());
  for (const char* text :
       {"hit rate 25.0%", "peak 8 in use of a budget of 8", "would need 12", "preemptions     2",
        "int8 K/V: max |logit diff| 1.0e-02", "80 decode steps compared", "0 over the tolerance"}) {
    EXPECT_NE(table.find(text), std::string::npos) << text << "\n" << table;
  }
}

TEST(SvgPlot, DrawsBandsHitRateAndPreemptionTicks) {
  const std::string svg = timeline_svg(sample_report());
  EXPECT_EQ(svg.rfind("<svg ", 0), 0u);
  EXPECT_EQ(svg.substr(svg.size() - 7), "</svg>\n");
  for (const char* part : {"<title>live", "<title>cached", "<title>free",
                           "<title>cumulative prefix hit rate", "<title>preemptions"}) {
    EXPECT_NE(svg.find(part), std::string::npos) << part;
  }
  EngineReport empty = sample_report();
  empty.timeline.clear();
  const std::string bare = timeline_svg(empty);
  EXPECT_EQ(bare.find("<title>live"), std::string::npos);
  EXPECT_EQ(bare.substr(bare.size() - 7), "</svg>\n");
}

}  // namespace
}  // namespace kvcache::serving
