// KV-cache block allocator: refcounted fixed-size blocks with content-hash reuse.
//
// Blocks are shared by reference count (n samples of one prompt, or any two requests
// with the same prompt prefix, point at the same full blocks). A block whose count
// drops to zero goes to the tail of an LRU free list but keeps its content hash, so a
// later request with the same prefix can revive it without recomputing; allocation
// takes the least recently freed block and forgets its hash (prefix caching as in
// vLLM's block manager). All operations are O(1) except hash_tokens (O(tokens)).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace elastic_decode {

// Raised when a request asks for more blocks than are free; surfaced in Python as
// elastic_decode._C.OutOfBlocksError (a RuntimeError).
class OutOfBlocks : public std::runtime_error {
 public:
  explicit OutOfBlocks(const std::string& what) : std::runtime_error(what) {}
};

class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t num_blocks);

  // Takes `n` free blocks (all or none), each with refcount 1.
  std::vector<int64_t> allocate(int64_t n);
  // Adds one reference to each block (sharing without copying).
  void fork(const std::vector<int64_t>& blocks);
  // Drops one reference from each block; a block at zero becomes free (hash kept).
  void free(const std::vector<int64_t>& blocks);
  // The block holding content `hash`, with one more reference, or -1 if none.
  int64_t lookup(uint64_t hash);
  // The block holding content `hash` without taking a reference, or -1 (admission checks).
  int64_t peek(uint64_t hash) const;
  // Records that full block `block` holds content `hash` (first writer wins).
  void register_hash(int64_t block, uint64_t hash);
  // Forgets every content hash (after a weight update the cached K/V are stale).
  void reset_prefix_cache();

  int64_t num_blocks() const { return static_cast<int64_t>(refcount_.size()); }
  int64_t num_free() const { return num_free_; }
  int64_t refcount(int64_t block) const;
  int64_t num_cached() const { return static_cast<int64_t>(hash_to_block_.size()); }

  // Chained content hash of one block: depends on the parent block's hash and the tokens.
  static uint64_t hash_tokens(uint64_t parent, const std::vector<int64_t>& tokens);

 private:
  void check_block(int64_t block) const;
  void unlink(int64_t block);
  void push_back(int64_t block);
  void drop_hash(int64_t block);

  std::vector<int64_t> refcount_;
  std::vector<int64_t> prev_, next_;  // intrusive LRU free list; sentinel index = num_blocks
  std::vector<uint8_t> in_free_;
  std::vector<uint8_t> has_hash_;
  std::vector<uint64_t> hash_;
  std::unordered_map<uint64_t, int64_t> hash_to_block_;
  int64_t num_free_ = 0;
};

}  // namespace elastic_decode
