// Runs a tvmq artifact's model.so in a Relax VM and moves tensors through raw files.
//
// tvmq.emulate cross-compiles this file for aarch64 and runs it under qemu-user, so an
// aarch64 artifact can be checked on an x86 machine. It does what
// tvm.runtime.vm.VirtualMachine does in Python: vm_load_executable, vm_initialization on
// the CPU with the pooled allocator, then "main".
//
//   driver MODEL.so OUT_DIR [IN.bin DTYPE DIMS]...
//
// DIMS is comma-separated ("1,1,28,28") or "-" for a scalar. Output i is written to
// OUT_DIR/out<i>.bin and described on stdout as "out<i> DTYPE DIMS". Any error prints
// one line starting "error: " on stderr and exits with status 2.

#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Matches tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR.
constexpr int kPooledAllocator = 2;
// TVM's kernels may assume their buffers are aligned as TVM's own allocator aligns them.
constexpr size_t kAlignment = 64;

// The headers of tvm::runtime::Tensor need TVM sources the wheel does not ship, so input
// tensors are allocated here through tvm::ffi.
struct AlignedAlloc {
  void AllocData(DLTensor* tensor) {
    size_t size = (tvm::ffi::GetDataSize(*tensor) + kAlignment - 1) / kAlignment * kAlignment;
    tensor->data = std::aligned_alloc(kAlignment, size ? size : kAlignment);
    if (tensor->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

std::vector<int64_t> ParseDims(const std::string& text) {
  std::vector<int64_t> dims;
  if (text == "-") return dims;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) dims.push_back(std::stoll(item));
  return dims;
}

std::string FormatDims(const DLTensor* tensor) {
  if (tensor->ndim == 0) return "-";
  std::string text;
  for (int i = 0; i < tensor->ndim; ++i) {
    if (i) text += ",";
    text += std::to_string(tensor->shape[i]);
  }
  return text;
}

tvm::ffi::Tensor ReadTensor(const std::string& path, const std::string& dtype,
                                const std::string& dims) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read input file " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::vector<int64_t> shape = ParseDims(dims);
  auto tensor = tvm::ffi::Tensor::FromNDAlloc(
      AlignedAlloc(), tvm::ffi::ShapeView(shape.data(), shape.size()),
      tvm::ffi::StringToDLDataType(dtype), DLDevice{kDLCPU, 0});
  size_t expected = tvm::ffi::GetDataSize(*tensor.GetDLTensorPtr());
  if (bytes.size() != expected) {
    throw std::runtime_error(path + " holds " + std::to_string(bytes.size()) + " bytes; " +
                             dtype + " " + dims + " needs " + std::to_string(expected));
  }
  if (!bytes.empty()) std::memcpy(tensor.GetDLTensorPtr()->data, bytes.data(), bytes.size());
  return tensor;
}

void WriteTensor(const tvm::ffi::Tensor& value, const std::string& out_dir, size_t index) {
  const DLTensor* tensor = value.GetDLTensorPtr();
  if (tensor->device.device_type != kDLCPU || !value.IsContiguous()) {
    throw std::runtime_error("output " + std::to_string(index) +
                             " is not a contiguous CPU tensor");
  }
  const char* data = static_cast<const char*>(tensor->data) + tensor->byte_offset;
  size_t size = tvm::ffi::GetDataSize(*tensor);
  std::string name = "out" + std::to_string(index);
  std::ofstream file(out_dir + "/" + name + ".bin", std::ios::binary);
  file.write(data, static_cast<std::streamsize>(size));
  if (!file) throw std::runtime_error("cannot write " + out_dir + "/" + name + ".bin");
  std::cout << name << " " << tvm::ffi::DLDataTypeToString(tensor->dtype) << " "
            << FormatDims(tensor) << "\n";
}

tvm::ffi::Function Require(tvm::ffi::Module module, const std::string& name) {
  auto function = module->GetFunction(name);
  if (!function.has_value()) throw std::runtime_error("the library has no function " + name);
  return *function;
}

int Run(int argc, char** argv) {
  if (argc < 3 || (argc - 3) % 3 != 0) {
    throw std::runtime_error("usage: driver MODEL.so OUT_DIR [IN.bin DTYPE DIMS]...");
  }
  std::string out_dir = argv[2];
  tvm::ffi::Module library = tvm::ffi::Module::LoadFromFile(argv[1]);
  tvm::ffi::Module vm = Require(library, "vm_load_executable")().cast<tvm::ffi::Module>();
  Require(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, kPooledAllocator);

  std::vector<tvm::ffi::Any> inputs;
  for (int i = 3; i < argc; i += 3) inputs.emplace_back(ReadTensor(argv[i], argv[i + 1], argv[i + 2]));
  std::vector<tvm::ffi::AnyView> views(inputs.begin(), inputs.end());
  tvm::ffi::Any result;
  Require(vm, "main").CallPacked(views.data(), static_cast<int>(views.size()), &result);

  if (auto tensor = result.as<tvm::ffi::Tensor>()) {
    WriteTensor(*tensor, out_dir, 0);
  } else if (auto tuple = result.as<tvm::ffi::Array<tvm::ffi::Any>>()) {
    for (size_t i = 0; i < tuple->size(); ++i) {
      auto item = (*tuple)[i].as<tvm::ffi::Tensor>();
      if (!item.has_value()) throw std::runtime_error("output " + std::to_string(i) + " is not a tensor");
      WriteTensor(*item, out_dir, i);
    }
  } else {
    throw std::runtime_error("main returned " + result.GetTypeKey() + ", not tensors");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& err) {
    // Keep the message to one line: the caller reports it as one.
    std::string message = err.what();
    for (char& c : message) {
      if (c == '\n') c = ' ';
    }
    std::cerr << "error: " << message << std::endl;
    return 2;
  }
}
