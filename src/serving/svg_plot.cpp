// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "serving/svg_plot.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "kvcache/dtype.h"

namespace kvcache::serving {
namespace {

constexpr double kWidth = 820, kHeight = 380;
constexpr double kLeft = 64, kRight = 64, kTop = 44, kBottom = 64;
constexpr size_t kMaxPoints = 400;  // the timeline is thinned to this many columns

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f", v);
  return buf;
}

struct Frame {
  double steps = 1, pages = 1;
  [[nodiscard]] double x(double step) const {
    return kLeft + (kWidth - kLeft - kRight) * step / steps;
  }
  [[nodiscard]] double y(double pages_or_fraction, double full) const {
    return kHeight - kBottom - (kHeight - kTop - kBottom) * pages_or_fraction / full;
  }
};

// A closed band between lower(p) and upper(p) over the points.
template <class Lower, class Upper>
std::string band(const std::vector<TimelinePoint>& pts, const Frame& f, Lower lower, Upper upper,
                 const char* color, const char* label) {
  std::string d;
  for (const TimelinePoint& p : pts) {
    d += (d.empty() ? "M" : " L") + num(f.x(static_cast<double>(p.step))) + "," +
         num(f.y(upper(p), f.pages));
  }
  for (auto it = pts.rbegin(); it != pts.rend(); ++it) {
    d += " L" + num(f.x(static_cast<double>(it->step))) + "," + num(f.y(lower(*it), f.pages));
  }
  return "  <path d=\"" + d + " Z\" fill=\"" + color + "\"><title>" + label + "</title></path>\n";
}

std::string text(double x, double y, const std::string& s, const char* anchor = "start",
                 const char* extra = "") {
  return "  <text x=\"" + num(x) + "\" y=\"" + num(y) + "\" text-anchor=\"" + anchor + "\"" +
         extra + ">" + s + "</text>\n";
}

}  // namespace

std::string timeline_svg(const EngineReport& r) {
  std::vector<TimelinePoint> pts;
  const size_t every = std::max<size_t>(1, (r.timeline.size() + kMaxPoints - 1) / kMaxPoints);
  for (size_t i = 0; i < r.timeline.size(); i += every) pts.push_back(r.timeline[i]);
  if (!r.timeline.empty() && (r.timeline.size() - 1) % every != 0) pts.push_back(r.timeline.back());

  Frame f;
  f.steps = std::max<double>(1.0, pts.empty() ? 1.0 : static_cast<double>(pts.back().step));
  f.pages = std::max<double>(1.0, static_cast<double>(r.budget_pages));
  std::string s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + num(kWidth) +
                  "\" height=\"" + num(kHeight) + "\" viewBox=\"0 0 " + num(kWidth) + " " +
                  num(kHeight) +
                  "\" font-family=\"sans-serif\" font-size=\"12\">\n"
                  "  <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  char title[160];
  std::snprintf(title, sizeof(title),
                "kvcache demo: %lld conversations, %s K/V, pages of the full-attention pool",
                static_cast<long long>(r.conversations), name(r.kv_dtype));
  s += text(kWidth / 2, 22, title, "middle", " font-size=\"14\"");

  const auto zero = [](const TimelinePoint&) { return 0.0; };
  const auto live = [](const TimelinePoint& p) { return static_cast<double>(p.live); };
  const auto held = [](const TimelinePoint& p) { return static_cast<double>(p.live + p.cached); };
  const auto all = [](const TimelinePoint& p) {
    return static_cast<double>(p.live + p.cached + p.free);
  };
  if (!pts.empty()) {
    s += band(pts, f, zero, live, "#3b6fb6", "live: held by running sequences");
    s += band(pts, f, live, held, "#8fb8e8", "cached: prefix pages nobody holds (evictable)");
    s += band(pts, f, held, all, "#e6e6e6", "free");
    std::string line;
    for (const TimelinePoint& p : pts) {
      line += (line.empty() ? "M" : " L") + num(f.x(static_cast<double>(p.step))) + "," +
              num(f.y(p.hit_rate, 1.0));
    }
    s += "  <path d=\"" + line +
         "\" fill=\"none\" stroke=\"#d9531e\" stroke-width=\"2\"><title>cumulative prefix hit "
         "rate</title></path>\n";
    // A tick under the top edge wherever sequences were preempted since the previous column.
    std::string ticks;
    for (size_t i = 1; i < pts.size(); ++i) {
      if (pts[i].preemptions == pts[i - 1].preemptions) continue;
      const std::string x = num(f.x(static_cast<double>(pts[i].step)));
      ticks += " M" + x + "," + num(kTop) + " L" + x + "," + num(kTop + 10);
    }
    if (!ticks.empty()) {
      s += "  <path d=\"" + ticks.substr(1) +
           "\" stroke=\"#222\" stroke-width=\"1.5\"><title>preemptions</title></path>\n";
    }
  }
  // Axes: pages on the left, hit rate on the right, steps below.
  const double x0 = kLeft, x1 = kWidth - kRight, y0 = kHeight - kBottom, y1 = kTop;
  s += "  <path d=\"M" + num(x0) + "," + num(y1) + " L" + num(x0) + "," + num(y0) + " L" + num(x1) +
       "," + num(y0) + " L" + num(x1) + "," + num(y1) + "\" fill=\"none\" stroke=\"black\"/>\n";
  for (int i = 0; i <= 4; ++i) {
    const double frac = i / 4.0;
    const double y = f.y(frac, 1.0);
    s += text(x0 - 6, y + 4, std::to_string(static_cast<long long>(frac * f.pages + 0.5)), "end");
    s += text(x1 + 6, y + 4, std::to_string(i * 25) + "%");
    s += text(f.x(frac * f.steps), y0 + 16,
              std::to_string(static_cast<long long>(frac * f.steps + 0.5)), "middle");
  }
  s += text((x0 + x1) / 2, y0 + 34, "scheduler step", "middle");
  s += text(16, (y0 + y1) / 2, "pages", "middle",
            (" transform=\"rotate(-90 16 " + num((y0 + y1) / 2) + ")\"").c_str());
  s += text(
      kWidth - 14, (y0 + y1) / 2, "prefix hit rate (cumulative)", "middle",
      (" transform=\"rotate(90 " + num(kWidth - 14) + " " + num((y0 + y1) / 2) + ")\"").c_str());
  // Legend.
  const struct {
    const char* color;
    const char* label;
  } legend[] = {{"#3b6fb6", "live"},
                {"#8fb8e8", "cached (evictable)"},
                {"#e6e6e6", "free"},
                {"#d9531e", "hit rate"},
                {"#222", "preemption (tick at the top)"}};
  double lx = x0;
  for (const auto& l : legend) {
    s += "  <rect x=\"" + num(lx) + "\" y=\"" + num(kHeight - 20) +
         "\" width=\"12\" height=\"12\" fill=\"" + l.color + "\" stroke=\"#888\"/>\n";
    s += text(lx + 16, kHeight - 10, l.label);
    lx += 40 + 7.0 * static_cast<double>(std::char_traits<char>::length(l.label));
  }
  s += "</svg>\n";
  return s;
}

}  // namespace kvcache::serving
