// Schemas of the memory-bank ops (see docs/backend_contract.md, "class_bank" and "fifo_bank").
// Mutated buffers are annotated (a!), ...; the mutating ops return nothing.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(icakd_fast_C, m) {
  m.def(
      "class_bank_enqueue_(Tensor(a!) bank, Tensor(b!) count, Tensor(c!) ptr, Tensor(d!) sums, "
      "Tensor feats, Tensor labels, Tensor mask) -> ()");
  m.def("class_bank_resync_(Tensor bank, Tensor count, Tensor(a!) sums, Tensor classes) -> ()");
  m.def(
      "fifo_bank_enqueue_(Tensor(a!) bank, Tensor(b!) bank_labels, Tensor(c!) ptr, Tensor feats, "
      "Tensor labels, Tensor mask) -> ()");
  m.def("fifo_bank_sums(Tensor bank, Tensor bank_labels, int num_classes) -> (Tensor, Tensor)");
  // One step's whole update of a bank (docs/backend_contract.md, "bank_update"): rows with a
  // non-finite value once cast to the storage dtype are skipped and, where mask offered them,
  // counted in `refused` (mask undefined: every row offered); the others are enqueued; the class bank then resyncs resync_chunk
  // classes from resync_pos on and advances it.
  m.def(
      "class_bank_update_(Tensor(a!) bank, Tensor(b!) count, Tensor(c!) ptr, Tensor(d!) sums, "
      "Tensor(e!) resync_pos, Tensor(f!) refused, Tensor feats, Tensor labels, Tensor? mask, int resync_chunk) -> ()");
  m.def(
      "fifo_bank_update_(Tensor(a!) bank, Tensor(b!) bank_labels, Tensor(c!) ptr, Tensor(d!) refused, "
      "Tensor feats, Tensor labels, Tensor? mask) -> ()");
  // The same update of several banks that share one batch's labels (the student's and the
  // teacher's banks of one step) in one call: entry i of every list belongs to bank i, and every
  // list holds one entry per bank.
  m.def(
      "class_banks_update_(Tensor(a!)[] bank, Tensor(b!)[] count, Tensor(c!)[] ptr, Tensor(d!)[] sums, "
      "Tensor(e!)[] resync_pos, Tensor(f!)[] refused, Tensor[] feats, Tensor labels, Tensor?[] mask, "
      "int resync_chunk) -> ()");
  m.def(
      "fifo_banks_update_(Tensor(a!)[] bank, Tensor(b!)[] bank_labels, Tensor(c!)[] ptr, Tensor(d!)[] refused, "
      "Tensor[] feats, Tensor labels, Tensor?[] mask) -> ()");
}
