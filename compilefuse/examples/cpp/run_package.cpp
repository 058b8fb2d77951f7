// Load a package written by compilefuse.export and run it once, from C++ (no Python).
//   run_package model.pt2 [N C H W]   -> prints the output's shape and its sum
// The input is all ones, so the result can be compared with Python's for the same package.
// AOTInductor does not check input shapes or dtypes: pass what the model was exported with
// (the package's extra/compilefuse.json lists it).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <iomanip>
#include <iostream>
#include <vector>

int main(int argc, char* argv[]) {
  if (argc < 3) {
    std::cerr << "usage: run_package model.pt2 size [size ...]\n";
    return 2;
  }
  std::vector<int64_t> sizes;
  for (int i = 2; i < argc; ++i) sizes.push_back(std::stoll(argv[i]));

  c10::InferenceMode inference;
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<torch::Tensor> inputs = {torch::ones(sizes)};
  std::vector<torch::Tensor> outputs = loader.run(inputs);

  std::cout << "shape " << outputs[0].sizes() << " sum " << std::setprecision(9) << outputs[0].sum().item<double>() << "\n";
  return 0;
}
