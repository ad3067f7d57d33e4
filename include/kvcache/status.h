// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Status and Result<T>: how every call that a caller can make fail reports it.
// An OK Status costs nothing (no allocation); an error carries a Code and a message in one format:
// "<op>: <what was wrong>, expected <what was expected>". No exception crosses the public API.
// Status and Result are values: intentionally copyable (Result when T is), thread-compatible.

#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include "kvcache/export.h"

namespace kvcache {

enum class Code {
  ok,
  invalid_argument,    // the caller passed something wrong (shape, dtype, range)
  out_of_range,        // an index or position outside what exists
  resource_exhausted,  // no memory, no free pages, capacity fixed and full
  not_found,
  corruption,   // damaged cache files
  unavailable,  // backend not built, or no device
  internal,
};

// "ok", "invalid_argument", ...
KVCACHE_API const char* code_name(Code code);

class [[nodiscard]] KVCACHE_API Status {
 public:
  Status() = default;  // OK
  // Intentionally copyable.

  static Status invalid_argument(std::string message) {
    return Status(Code::invalid_argument, std::move(message));
  }
  static Status out_of_range(std::string message) {
    return Status(Code::out_of_range, std::move(message));
  }
  static Status resource_exhausted(std::string message) {
    return Status(Code::resource_exhausted, std::move(message));
  }
  static Status not_found(std::string message) {
    return Status(Code::not_found, std::move(message));
  }
  static Status corruption(std::string message) {
    return Status(Code::corruption, std::move(message));
  }
  static Status unavailable(std::string message) {
    return Status(Code::unavailable, std::move(message));
  }
  static Status internal(std::string message) { return Status(Code::internal, std::move(message)); }

  [[nodiscard]] bool ok() const { return state_ == nullptr; }
  [[nodiscard]] Code code() const { return state_ ? state_->code : Code::ok; }
  // Empty for OK.
  [[nodiscard]] const std::string& message() const;
  // "OK" or "invalid_argument: <message>".
  [[nodiscard]] std::string to_string() const;

 private:
  struct State {
    Code code;
    std::string message;
  };
  Status(Code code, std::string message);

  std::shared_ptr<const State> state_;  // null when OK
};

namespace detail {
[[noreturn]] KVCACHE_API void die_on_bad_result_access(const Status& status);
[[noreturn]] KVCACHE_API void die_on_ok_status_in_result();
}  // namespace detail

// Holds a T or a non-OK Status. Reading value() of an error aborts with the status printed:
// that is a bug in the caller, not an input error.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<1>, std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::in_place_index<0>, std::move(status)) {  // NOLINT
    if (std::get<0>(v_).ok()) detail::die_on_ok_status_in_result();
  }
  // Intentionally copyable when T is.

  [[nodiscard]] bool ok() const { return v_.index() == 1; }
  // OK when a value is held.
  [[nodiscard]] Status status() const { return ok() ? Status() : std::get<0>(v_); }

  T& value() & {
    check();
    return std::get<1>(v_);
  }
  const T& value() const& {
    check();
    return std::get<1>(v_);
  }
  T&& value() && {
    check();
    return std::get<1>(std::move(v_));
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  void check() const {
    if (!ok()) detail::die_on_bad_result_access(std::get<0>(v_));
  }
  std::variant<Status, T> v_;
};

}  // namespace kvcache
