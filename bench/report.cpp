// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "bench/report.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "core/check.h"

namespace kvcache::bench {
namespace {

std::string format_number(double x) {
  char buf[64];
  if (std::isfinite(x) && std::fabs(x) >= 1e-3 && std::fabs(x) < 1e9) {
    std::snprintf(buf, sizeof buf, "%.4g", x);
  } else {
    std::snprintf(buf, sizeof buf, "%.3e", x);
  }
  return buf;
}

std::string cell_text(const Value& v) {
  if (const auto* s = std::get_if<std::string>(&v)) return *s;
  if (const auto* i = std::get_if<int64_t>(&v)) return std::to_string(*i);
  return format_number(std::get<double>(v));
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string json_value(const Value& v) {
  if (const auto* s = std::get_if<std::string>(&v)) return json_string(*s);
  if (const auto* i = std::get_if<int64_t>(&v)) return std::to_string(*i);
  const double d = std::get<double>(v);
  if (!std::isfinite(d)) return "null";  // JSON has no inf/NaN
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", d);
  return buf;
}

}  // namespace

Report::Report(std::vector<std::string> columns) : columns_(std::move(columns)) {}

void Report::add_row(std::vector<Value> values) {
  KV_CHECK(values.size() == columns_.size());
  rows_.push_back(std::move(values));
}

std::string Report::table() const {
  std::vector<size_t> width(columns_.size());
  for (size_t c = 0; c < columns_.size(); ++c) width[c] = columns_[c].size();
  for (const auto& row : rows_) {
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], cell_text(row[c]).size());
  }
  const auto line = [&](const auto& cell) {
    std::string out;
    for (size_t c = 0; c < columns_.size(); ++c) {
      std::string text = cell(c);
      if (c + 1 < columns_.size()) text.resize(width[c] + 2, ' ');
      out += text;
    }
    return out + "\n";
  };
  std::string out = line([&](size_t c) { return columns_[c]; });
  for (const auto& row : rows_) out += line([&](size_t c) { return cell_text(row[c]); });
  return out;
}

std::string Report::json() const {
  std::string out = "[\n";
  for (size_t r = 0; r < rows_.size(); ++r) {
    out += "  {";
    for (size_t c = 0; c < columns_.size(); ++c) {
      if (c) out += ", ";
      out += json_string(columns_[c]) + ": " + json_value(rows_[r][c]);
    }
    out += r + 1 < rows_.size() ? "},\n" : "}\n";
  }
  return out + "]\n";
}

Status Report::write_json(const std::string& path) const {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (f) f << json();
  if (!f) {
    return Status::unavailable("bench: cannot write '" + path + "': " + std::strerror(errno) +
                               ", expected a writable path");
  }
  return Status();
}

double median(std::vector<double>& samples) {
  KV_CHECK(!samples.empty());
  const size_t mid = samples.size() / 2;
  std::nth_element(samples.begin(), samples.begin() + static_cast<std::ptrdiff_t>(mid),
                   samples.end());
  const double upper = samples[mid];
  if (samples.size() % 2 == 1) return upper;
  const double lower =
      *std::max_element(samples.begin(), samples.begin() + static_cast<std::ptrdiff_t>(mid));
  return (lower + upper) / 2;
}

}  // namespace kvcache::bench
