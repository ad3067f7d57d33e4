// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/status.h"

#include <cstdio>
#include <cstdlib>

#include "core/check.h"

namespace kvcache {

const char* code_name(Code code) {
  switch (code) {
    case Code::ok:
      return "ok";
    case Code::invalid_argument:
      return "invalid_argument";
    case Code::out_of_range:
      return "out_of_range";
    case Code::resource_exhausted:
      return "resource_exhausted";
    case Code::not_found:
      return "not_found";
    case Code::corruption:
      return "corruption";
    case Code::unavailable:
      return "unavailable";
    case Code::internal:
      return "internal";
  }
  return "unknown";
}

Status::Status(Code code, std::string message)
    : state_(code == Code::ok ? nullptr
                              : std::make_shared<const State>(State{code, std::move(message)})) {}

const std::string& Status::message() const {
  static const std::string kEmpty;
  return state_ ? state_->message : kEmpty;
}

std::string Status::to_string() const {
  if (ok()) return "OK";
  return std::string(code_name(state_->code)) + ": " + state_->message;
}

namespace detail {

void die_on_bad_result_access(const Status& status) {
  std::fprintf(stderr, "kvcache: value() of a Result holding an error: %s\n",
               status.to_string().c_str());
  std::abort();
}

void die_on_ok_status_in_result() {
  std::fprintf(stderr, "kvcache: a Result was built from an OK Status (it needs a value)\n");
  std::abort();
}

void check_failed(const char* file, int line, const char* expr) {
  std::fprintf(stderr, "kvcache: %s:%d: check failed: %s\n", file, line, expr);
  std::abort();
}

}  // namespace detail
}  // namespace kvcache
