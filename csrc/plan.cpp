// The persistent step plan: one param group's buckets held in C++ across steps.
//
// NOTE [persistent step plan]
// A fused update of a thousand small tensors costs microseconds; what a step
// then spends is host work per tensor: re-reading every `.grad` in Python,
// checking it, and turning Python lists into the ops' Tensor[] arguments. A
// GroupPlan is built once per bucket layout (fastopt/_gather.py builds it next
// to the Python buckets) and holds, per bucket, the parameters, every state
// tensor and the step counters as C++ vectors. Each step `refresh` re-reads
// `.grad` in C++ and revalidates what the gather cache relies on (NOTE [gather
// cache] in fastopt/_gather.py), all with C-level identity compares:
//   * the group's params list is the same object, of the same length, holding
//     the same parameter objects;
//   * the set of parameters with a gradient is unchanged;
//   * each gradient is strided, of the bucket's grad dtype, contiguous when the
//     bucket is, and each parameter still of the bucket's dtype and layout
//     (`p.data = ...` changes the tensor the plan holds, so it is seen);
//   * optimizer.state[p] is the dict the plan was built from and each of its
//     entries is the tensor object the plan holds (a replaced state tensor or a
//     loaded state dict fails here).
// Any failure returns false and Python rebuilds; nothing is launched from a
// stale plan. The update and norm methods then call the fastopt ops through
// the dispatcher with the held vectors (no Python list is built), so Python
// does O(1) work per bucket per step. The ops keep their own argument checks:
// the plan skips the conversion, not the validation.
//
// Buckets of DTensor parameters (whose gradients must be unwrapped in Python)
// and of complex parameters (real views) are never planned; they keep the
// Python path.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fastopt::plan {
namespace {

namespace py = pybind11;
using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<Tensor>;

const Tensor& unpack(py::handle obj) {
  TORCH_CHECK(THPVariable_Check(obj.ptr()), "fastopt step plan: expected a Tensor");
  return THPVariable_Unpack(obj.ptr());
}

// NOTE [dict entries by position]
// Checking that optimizer.state[p] is still the plan's dict by lookup would
// hash p, and Tensor.__hash__ is a Python function: a frame per parameter per
// step. Instead the plan remembers where each entry it relies on sits in the
// dict's entry table (the offset PyDict_Next was called with when it yielded
// the entry) and re-reads that slot: PyDict_Next from the saved offset yields
// the first live entry at or after it. A live entry with the same key object
// and the same value object means the mapping is intact (a dict holds one
// live entry per key; a deleted entry has no key and is skipped); anything
// else (a replaced value, a deletion, a resize that moved entries) fails the
// check, and the plan is rebuilt. Keys and values are held (referenced) by
// the plan, so their addresses cannot be reused by other objects.
struct DictEntry {
  Py_ssize_t pos;
  py::object key;
  py::object value;

  bool holds(PyObject* dict) const {
    Py_ssize_t at = pos;
    PyObject* k;
    PyObject* v;
    return PyDict_Next(dict, &at, &k, &v) && k == key.ptr() && v == value.ptr();
  }
};

// The entry of `dict` whose key satisfies `match`, or nullopt.
template <typename Match>
std::optional<DictEntry> find_entry(PyObject* dict, Match&& match) {
  Py_ssize_t pos = 0;
  Py_ssize_t before = 0;
  PyObject* k;
  PyObject* v;
  while (PyDict_Next(dict, &pos, &k, &v)) {
    if (match(k)) {
      return DictEntry{before, py::reinterpret_borrow<py::object>(k),
                       py::reinterpret_borrow<py::object>(v)};
    }
    before = pos;
  }
  return std::nullopt;
}

// The typed handle of op `name` (declared in csrc/ops.cpp), looked up once.
template <typename Signature>
const c10::TypedOperatorHandle<Signature>& op_handle(const char* name) {
  // one static per (Signature, call site): each op below has its own signature
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  return handle;
}

using AdamWSig = void(TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                      TensorList, double, const OptTensor&, double, double, double, double, bool,
                      bool, const OptTensor&, std::optional<double>, const OptTensor&,
                      const OptTensor&);
using LionSig = void(TensorList, TensorList, TensorList, TensorList, double, const OptTensor&,
                     double, double, double, bool, const OptTensor&, std::optional<double>,
                     const OptTensor&, const OptTensor&);
using AdEMAMixSig = void(TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                         TensorList, double, const OptTensor&, double, double, double, double,
                         std::optional<double>, std::optional<double>, double, double, bool,
                         const OptTensor&, std::optional<double>, const OptTensor&,
                         const OptTensor&);
using SumsqSig = Tensor(TensorList, const OptTensor&, std::optional<double>);

// The tensors of one bucket (fastopt/_gather.py:Bucket), held across steps.
class BucketPlan {
 public:
  // `state_dicts[j]` is optimizer.state[params[j]]; `held` maps each state key
  // the bucket uses (its moments, "master_param", "step") to the tensors of
  // those dicts, in bucket order.
  BucketPlan(const py::list& params, const py::list& grads, std::vector<int64_t> indices,
             at::ScalarType grad_dtype, bool dense, const py::list& state_dicts,
             const py::dict& held, const py::dict& aliases)
      : indices_(std::move(indices)), grad_dtype_(grad_dtype), dense_(dense) {
    const size_t n = params.size();
    TORCH_CHECK(n > 0 && grads.size() == n && indices_.size() == n && state_dicts.size() == n,
                "fastopt step plan: inconsistent bucket");
    params_.reserve(n);
    for (py::handle p : params) params_.push_back(unpack(p));
    param_dtype_ = params_[0].scalar_type();
    device_ = params_[0].device();
    grads_.reserve(n);
    for (py::handle g : grads) grads_.push_back(unpack(g));
    for (py::handle d : state_dicts) state_dicts_.emplace_back(py::reinterpret_borrow<py::object>(d));
    state_entries_.resize(n);
    key_entries_.resize(n);
    for (auto item : held) {
      const std::string key = py::cast<std::string>(item.first);
      const py::list tensors = py::reinterpret_borrow<py::list>(item.second);
      TORCH_CHECK(tensors.size() == n, "fastopt step plan: state '", key, "' has ",
                  tensors.size(), " tensors for ", n, " params");
      // the op list a state feeds, when not its own name (a remainder travels in
      // the ops' master list: NOTE [master remainder] in update_math.h)
      const std::string list_name =
          aliases.contains(key) ? py::cast<std::string>(aliases[py::str(key)]) : key;
      std::vector<Tensor>& list = lists_[list_name];
      list.reserve(n);
      for (size_t j = 0; j < n; ++j) {
        py::handle t = tensors[j];
        list.push_back(unpack(t));
        auto entry = find_entry(state_dicts_[j].ptr(), [&](PyObject* k) {
          return PyUnicode_Check(k) && PyUnicode_CompareWithASCIIString(k, key.c_str()) == 0;
        });
        TORCH_CHECK(entry && entry->value.ptr() == t.ptr(), "fastopt step plan: state '", key,
                    "' of bucket entry ", j, " is not in its state dict");
        key_entries_[j].push_back(std::move(*entry));
      }
    }
    cpu_float_steps_ = true;
    for (const Tensor& t : list("step")) {
      cpu_float_steps_ = cpu_float_steps_ && t.is_cpu() && t.scalar_type() == at::kFloat &&
                         t.numel() == 1 && t.is_contiguous();
    }
  }

  // Re-take the gradients of `members` (the group's parameter tensors) and
  // check everything NOTE [persistent step plan] lists; false: rebuild.
  bool refresh(const std::vector<Tensor>& members, PyObject* optimizer_state) {
    for (size_t j = 0; j < params_.size(); ++j) {
      const int64_t i = indices_[j];
      const Tensor& g = members[i].grad();
      if (!g.defined() || g.layout() != c10::kStrided || g.scalar_type() != grad_dtype_) return false;
      const Tensor& p = params_[j];
      if (p.scalar_type() != param_dtype_ || p.device() != device_) return false;
      if (dense_ && !(g.is_contiguous() && p.is_contiguous())) return false;
      if (!state_entries_[j].holds(optimizer_state)) return false;
      PyObject* state = state_dicts_[j].ptr();
      for (const DictEntry& e : key_entries_[j]) {
        if (!e.holds(state)) return false;
      }
      grads_[j] = g;
    }
    return true;
  }

  const std::vector<Tensor>& list(const std::string& key) const {
    static const std::vector<Tensor> none;
    const auto it = lists_.find(key);
    return it == lists_.end() ? none : it->second;
  }

  // Where each parameter's entry sits in optimizer.state (`positions`: key
  // object -> offset, NOTE [dict entries by position]); false if one is missing.
  bool locate(const std::unordered_map<PyObject*, DictEntry>& positions,
              const std::vector<PyObject*>& member_objs) {
    for (size_t j = 0; j < params_.size(); ++j) {
      const auto it = positions.find(member_objs[indices_[j]]);
      if (it == positions.end() || it->second.value.ptr() != state_dicts_[j].ptr()) return false;
      state_entries_[j] = it->second;
    }
    return true;
  }

  py::list grads() const {
    py::list out(grads_.size());
    for (size_t j = 0; j < grads_.size(); ++j) {
      out[j] = py::reinterpret_steal<py::object>(THPVariable_Wrap(grads_[j]));
    }
    return out;
  }

  size_t size() const { return params_.size(); }

  // steps[j] += value: a loop over float32 CPU scalars (NOTE [step counters] in
  // fastopt/_base.py), torch's fused _foreach_add_ elsewhere.
  void add_steps(double value) {
    const std::vector<Tensor>& steps = list("step");
    if (cpu_float_steps_) {
      const float add = static_cast<float>(value);
      for (const Tensor& t : steps) *t.data_ptr<float>() += add;
    } else if (!steps.empty()) {
      at::_foreach_add_(steps, value);
    }
  }

  void add_steps_tensor(const Tensor& value) {
    const std::vector<Tensor>& steps = list("step");
    if (!steps.empty()) at::_foreach_add_(steps, value);
  }

  Tensor grad_sumsq(const OptTensor& grad_mul, std::optional<double> max_grad_value) const {
    py::gil_scoped_release no_gil;
    return op_handle<SumsqSig>("fastopt::grad_sumsq").redispatch(backend_keys(), grads_, grad_mul, max_grad_value);
  }

  void adamw(double lr, const OptTensor& lr_tensor, double beta1, double beta2, double eps,
             double weight_decay, bool amsgrad, bool maximize, const OptTensor& grad_mul,
             std::optional<double> max_grad_value, const OptTensor& clip_coef,
             const OptTensor& skip) const {
    py::gil_scoped_release no_gil;
    op_handle<AdamWSig>("fastopt::adamw_")
        .redispatch(backend_keys(), params_, grads_, list("exp_avg"), list("exp_avg_sq"),
              amsgrad ? list("max_exp_avg_sq") : list(""), list("master_param"), list("step"),
              lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_mul,
              max_grad_value, clip_coef, skip);
  }

  void lion(double lr, const OptTensor& lr_tensor, double beta1, double beta2,
            double weight_decay, bool maximize, const OptTensor& grad_mul,
            std::optional<double> max_grad_value, const OptTensor& clip_coef,
            const OptTensor& skip) const {
    py::gil_scoped_release no_gil;
    op_handle<LionSig>("fastopt::lion_")
        .redispatch(backend_keys(), params_, grads_, list("exp_avg"), list("master_param"), lr, lr_tensor, beta1,
              beta2, weight_decay, maximize, grad_mul, max_grad_value, clip_coef, skip);
  }

  void ademamix(double lr, const OptTensor& lr_tensor, double beta1, double beta2, double beta3,
                double alpha, std::optional<double> t_alpha, std::optional<double> t_beta3,
                double eps, double weight_decay, bool maximize, const OptTensor& grad_mul,
                std::optional<double> max_grad_value, const OptTensor& clip_coef,
                const OptTensor& skip) const {
    py::gil_scoped_release no_gil;
    op_handle<AdEMAMixSig>("fastopt::ademamix_")
        .redispatch(backend_keys(), params_, grads_, list("exp_avg"), list("exp_avg_slow"), list("exp_avg_sq"),
              list("master_param"), list("step"), lr, lr_tensor, beta1, beta2, beta3, alpha,
              t_alpha, t_beta3, eps, weight_decay, maximize, grad_mul, max_grad_value, clip_coef,
              skip);
  }

 private:
  // Straight to the device's kernel: the step runs under no_grad, and the
  // autograd fallback in between would box every Tensor[] argument (a copy of
  // every list) to check requires_grad on each tensor.
  c10::DispatchKeySet backend_keys() const {
    return c10::DispatchKeySet(device_.is_cpu() ? c10::DispatchKey::CPU : c10::DispatchKey::CUDA);
  }

  std::vector<Tensor> params_;
  std::vector<Tensor> grads_;
  std::vector<int64_t> indices_;  // positions in the group's params
  std::vector<py::object> state_dicts_;
  std::vector<DictEntry> state_entries_;             // optimizer.state[p] is state_dicts_[j]
  std::vector<std::vector<DictEntry>> key_entries_;  // [j]: each held key of state_dicts_[j]
  std::unordered_map<std::string, std::vector<Tensor>> lists_;  // state key -> tensors
  at::ScalarType grad_dtype_;
  at::ScalarType param_dtype_;
  at::Device device_{at::kCPU};
  bool dense_;
  bool cpu_float_steps_;  // steps are float32 CPU scalars: add_steps adds in a loop
};

// One param group: its members and which of them had a gradient at build time,
// and the plans of its buckets.
class GroupPlan {
 public:
  GroupPlan(const py::list& params, const py::object& optimizer_state,
            std::vector<std::shared_ptr<BucketPlan>> buckets)
      : params_list_(params), state_(optimizer_state), buckets_(std::move(buckets)) {
    for (py::handle p : params) {
      members_.emplace_back(py::reinterpret_borrow<py::object>(p));
      member_objs_.push_back(p.ptr());
      member_tensors_.push_back(unpack(p));
      had_grad_.push_back(member_tensors_.back().grad().defined());
    }
    std::unordered_map<PyObject*, DictEntry> positions;
    PyObject* state = optimizer_state.ptr();
    TORCH_CHECK(PyDict_Check(state), "fastopt step plan: optimizer.state is not a dict");
    Py_ssize_t pos = 0;
    Py_ssize_t before = 0;
    PyObject* k;
    PyObject* v;
    while (PyDict_Next(state, &pos, &k, &v)) {
      positions.emplace(k, DictEntry{before, py::reinterpret_borrow<py::object>(k),
                                     py::reinterpret_borrow<py::object>(v)});
      before = pos;
    }
    for (const auto& b : buckets_) {
      TORCH_CHECK(b->locate(positions, member_objs_),
                  "fastopt step plan: a bucket's state dict is not optimizer.state[p]");
    }
  }

  // True when the group's gradients were re-taken into every bucket and
  // nothing the plan relies on changed (NOTE [persistent step plan]).
  bool refresh(const py::handle& params, const py::handle& optimizer_state) {
    PyObject* list = params.ptr();
    if (list != params_list_.ptr() || optimizer_state.ptr() != state_.ptr()) return false;
    const Py_ssize_t n = static_cast<Py_ssize_t>(member_objs_.size());
    if (!PyList_Check(list) || PyList_GET_SIZE(list) != n) return false;
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (PyList_GET_ITEM(list, i) != member_objs_[i]) return false;
      if (member_tensors_[i].grad().defined() != static_cast<bool>(had_grad_[i])) return false;
    }
    for (const auto& b : buckets_) {
      if (!b->refresh(member_tensors_, optimizer_state.ptr())) return false;
    }
    return true;
  }

 private:
  py::object params_list_;
  py::object state_;
  std::vector<py::object> members_;  // keeps member_objs_ alive
  std::vector<PyObject*> member_objs_;
  std::vector<Tensor> member_tensors_;
  std::vector<uint8_t> had_grad_;
  std::vector<std::shared_ptr<BucketPlan>> buckets_;
};

}  // namespace
}  // namespace fastopt::plan

// The extension module fastopt._C: importing it also runs the op registrations
// (csrc/ops.cpp, csrc/cpu, csrc/cuda); the plan classes are its Python API.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using fastopt::plan::BucketPlan;
  using fastopt::plan::GroupPlan;
  namespace py = pybind11;
  py::class_<BucketPlan, std::shared_ptr<BucketPlan>>(m, "BucketPlan")
      .def(py::init<const py::list&, const py::list&, std::vector<int64_t>, at::ScalarType, bool,
                    const py::list&, const py::dict&, const py::dict&>(),
           py::arg("params"), py::arg("grads"), py::arg("indices"), py::arg("grad_dtype"), py::arg("dense"),
           py::arg("state_dicts"), py::arg("held"), py::arg("aliases"))
      .def("grads", &BucketPlan::grads)
      .def("__len__", &BucketPlan::size)
      .def("add_steps", &BucketPlan::add_steps, py::arg("value"))
      .def("add_steps_tensor", &BucketPlan::add_steps_tensor, py::arg("value"))
      .def("grad_sumsq", &BucketPlan::grad_sumsq, py::kw_only(), py::arg("grad_mul"),
           py::arg("max_grad_value"))
      .def("adamw_", &BucketPlan::adamw, py::kw_only(), py::arg("lr"), py::arg("lr_tensor"),
           py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
           py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_mul"),
           py::arg("max_grad_value"), py::arg("clip_coef"), py::arg("skip"))
      .def("lion_", &BucketPlan::lion, py::kw_only(), py::arg("lr"), py::arg("lr_tensor"),
           py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"), py::arg("maximize"),
           py::arg("grad_mul"), py::arg("max_grad_value"), py::arg("clip_coef"),
           py::arg("skip"))
      .def("ademamix_", &BucketPlan::ademamix, py::kw_only(), py::arg("lr"),
           py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"), py::arg("beta3"),
           py::arg("alpha"), py::arg("t_alpha"), py::arg("t_beta3"), py::arg("eps"),
           py::arg("weight_decay"), py::arg("maximize"), py::arg("grad_mul"),
           py::arg("max_grad_value"), py::arg("clip_coef"), py::arg("skip"));
  py::class_<GroupPlan, std::shared_ptr<GroupPlan>>(m, "GroupPlan")
      .def(py::init<const py::list&, const py::object&,
                    std::vector<std::shared_ptr<BucketPlan>>>(),
           py::arg("params"), py::arg("optimizer_state"), py::arg("buckets"))
      .def("refresh", &GroupPlan::refresh, py::arg("params"), py::arg("optimizer_state"));
}
