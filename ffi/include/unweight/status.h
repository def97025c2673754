// The outcome of a codec call that can meet bad input: ok, or a message naming the problem.
// Callers turn it into their own error type (Python FormatError, XLA ffi::Error).
#pragma once

#include <string>
#include <utility>

namespace unweight {

class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status Error(std::string message) { return Status(std::move(message)); }

  bool ok() const { return !failed_; }
  const std::string& message() const { return message_; }

 private:
  explicit Status(std::string message) : failed_(true), message_(std::move(message)) {}

  bool failed_ = false;
  std::string message_;
};

}  // namespace unweight
