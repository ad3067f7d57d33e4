// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// What `kvcache bench` prints and writes: rows of named measurements, shown as an aligned table
// and saved as a JSON array with one object per row (docs/CLI.md lists the keys per bench).
// Plain values; not thread-safe.

#include <cstdint>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "kvcache/status.h"

namespace kvcache::bench {

// One cell: text, an integer or a number (printed with `precision` significant digits).
using Value = std::variant<std::string, int64_t, double>;

class Report {
 public:
  // The column names, in order; every row gives a value for each.
  explicit Report(std::vector<std::string> columns);

  // REQUIRES: values.size() == the number of columns.
  void add_row(std::vector<Value> values);

  [[nodiscard]] const std::vector<std::string>& columns() const { return columns_; }
  [[nodiscard]] const std::vector<std::vector<Value>>& rows() const { return rows_; }

  // An aligned text table with a header line.
  [[nodiscard]] std::string table() const;
  // A JSON array of objects {column: value}.
  [[nodiscard]] std::string json() const;
  // Writes json() to path; unavailable (with the OS error) when the file cannot be written.
  [[nodiscard]] Status write_json(const std::string& path) const;

 private:
  std::vector<std::string> columns_;
  std::vector<std::vector<Value>> rows_;
};

// The median of samples (the mean of the two middle ones for an even count).
// REQUIRES: !samples.empty(). Reorders samples.
[[nodiscard]] double median(std::vector<double>& samples);

}  // namespace kvcache::bench
