// Loads SavedModels the way TF Serving does and runs their serving signature.
//
//   load_saved_model EXPORT INPUTS OUTPUTS [EXPORT INPUTS OUTPUTS ...]
//
// For each triple: restores EXPORT with tensorflow::LoadSavedModel (tag
// "serve", the C++ loader TF Serving uses), reads the input of every key of
// the "serving_default" SignatureDef from INPUTS/<key>.npy (float32), runs the
// session on the signature's tensor names, as TF Serving's Predict does, and
// writes each output to OUTPUTS/<key>.npy. Prints one line per export:
//   <method name> inputs=<keys> outputs=<keys>
// Exits 1 with the reason on stderr on any failure.

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/protobuf/meta_graph.pb.h"
#include "tensorflow/core/public/session.h"
#include "tensorflow/core/public/session_options.h"

namespace {

constexpr char kServeTag[] = "serve";
constexpr char kSignature[] = "serving_default";
constexpr char kNpyMagic[] = "\x93NUMPY";

// The value of `key` in a .npy header dict, e.g. "'<f4'" or "(2, 3)".
std::string HeaderField(const std::string& header, const std::string& key) {
  const std::string quoted = "'" + key + "':";
  size_t start = header.find(quoted);
  if (start == std::string::npos) throw std::runtime_error("npy header has no " + key);
  start += quoted.size();
  while (header[start] == ' ') ++start;
  const char close = header[start] == '(' ? ')' : ',';
  const size_t end = header.find(close, start + 1);
  return header.substr(start, end - start + (close == ')' ? 1 : 0));
}

// A little-endian float32, C-order .npy file as a tensor.
tensorflow::Tensor ReadNpy(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path);
  char magic[6];
  unsigned char version[2];
  file.read(magic, 6);
  file.read(reinterpret_cast<char*>(version), 2);
  if (!file || std::memcmp(magic, kNpyMagic, 6) != 0) throw std::runtime_error(path + " is not an .npy file");
  uint32_t header_size = 0;
  unsigned char size_bytes[4] = {0, 0, 0, 0};
  file.read(reinterpret_cast<char*>(size_bytes), version[0] == 1 ? 2 : 4);
  for (int i = 3; i >= 0; --i) header_size = (header_size << 8) | size_bytes[i];
  std::string header(header_size, '\0');
  file.read(&header[0], header_size);
  if (HeaderField(header, "descr") != "'<f4'") throw std::runtime_error(path + ": expected float32 ('<f4')");
  if (HeaderField(header, "fortran_order") != "False") throw std::runtime_error(path + ": expected C order");
  tensorflow::TensorShape shape;
  std::string dims = HeaderField(header, "shape");
  std::stringstream stream(dims.substr(1, dims.size() - 2));
  std::string dim;
  while (std::getline(stream, dim, ',')) {
    if (dim.find_first_not_of(' ') != std::string::npos) shape.AddDim(std::stoll(dim));
  }
  tensorflow::Tensor tensor(tensorflow::DT_FLOAT, shape);
  auto data = tensor.flat<float>();
  file.read(reinterpret_cast<char*>(data.data()), data.size() * sizeof(float));
  if (!file) throw std::runtime_error(path + ": fewer values than its shape holds");
  return tensor;
}

void WriteNpy(const std::string& path, const tensorflow::Tensor& tensor) {
  if (tensor.dtype() != tensorflow::DT_FLOAT) throw std::runtime_error("output " + path + " is not float32");
  std::string shape = "(";
  for (int i = 0; i < tensor.dims(); ++i) shape += std::to_string(tensor.dim_size(i)) + ", ";
  shape += ")";  // "(2, 3, )": a Python tuple literal, as numpy parses it
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  // Magic, version, size and header together are a multiple of 64 bytes, ending in a newline.
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::ofstream file(path, std::ios::binary);
  file.write(kNpyMagic, 6);
  file.put(1).put(0);
  file.put(static_cast<char>(header.size() & 0xff)).put(static_cast<char>(header.size() >> 8));
  file << header;
  auto data = tensor.flat<float>();
  file.write(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float));
  if (!file) throw std::runtime_error("cannot write " + path);
}

void Check(const absl::Status& status, const std::string& what) {
  if (!status.ok()) throw std::runtime_error(what + ": " + status.ToString());
}

void Serve(const std::string& export_dir, const std::string& inputs_dir, const std::string& outputs_dir) {
  tensorflow::SavedModelBundle bundle;
  Check(tensorflow::LoadSavedModel(tensorflow::SessionOptions(), tensorflow::RunOptions(), export_dir,
                                   {kServeTag}, &bundle),
        "LoadSavedModel(" + export_dir + ")");
  const auto& signatures = bundle.meta_graph_def.signature_def();
  const auto found = signatures.find(kSignature);
  if (found == signatures.end()) throw std::runtime_error(export_dir + " has no " + kSignature + " signature");
  const tensorflow::SignatureDef& signature = found->second;

  // Sorted keys, so the printed line does not depend on the map's order.
  std::map<std::string, std::string> inputs;
  for (const auto& [key, info] : signature.inputs()) inputs[key] = info.name();
  std::map<std::string, std::string> outputs;
  for (const auto& [key, info] : signature.outputs()) outputs[key] = info.name();

  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
  for (const auto& [key, tensor_name] : inputs) {
    if (signature.inputs().at(key).dtype() != tensorflow::DT_FLOAT) {
      throw std::runtime_error("input " + key + " is not float32 in the signature");
    }
    feeds.emplace_back(tensor_name, ReadNpy(inputs_dir + "/" + key + ".npy"));
  }
  std::vector<std::string> fetches;
  for (const auto& [key, tensor_name] : outputs) fetches.push_back(tensor_name);
  std::vector<tensorflow::Tensor> results;
  Check(bundle.session->Run(feeds, fetches, {}, &results), "Session::Run(" + export_dir + ")");

  std::cout << signature.method_name() << " inputs=";
  std::string separator;
  for (const auto& [key, name] : inputs) std::cout << separator << key, separator = ",";
  std::cout << " outputs=";
  separator.clear();
  size_t index = 0;
  for (const auto& [key, name] : outputs) {
    WriteNpy(outputs_dir + "/" + key + ".npy", results[index++]);
    std::cout << separator << key;
    separator = ",";
  }
  std::cout << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || (argc - 1) % 3 != 0) {
    std::cerr << "usage: " << argv[0] << " EXPORT INPUTS OUTPUTS [EXPORT INPUTS OUTPUTS ...]" << std::endl;
    return 2;
  }
  try {
    for (int i = 1; i < argc; i += 3) Serve(argv[i], argv[i + 1], argv[i + 2]);
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << std::endl;
    return 1;
  }
  return 0;
}
