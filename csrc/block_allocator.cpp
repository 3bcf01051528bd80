#include "block_allocator.h"

namespace elastic_decode {

BlockAllocator::BlockAllocator(int64_t num_blocks) {
  if (num_blocks <= 0) {
    throw std::invalid_argument("num_blocks must be positive, got " + std::to_string(num_blocks));
  }
  refcount_.assign(num_blocks, 0);
  prev_.assign(num_blocks + 1, 0);
  next_.assign(num_blocks + 1, 0);
  in_free_.assign(num_blocks, 0);
  has_hash_.assign(num_blocks, 0);
  hash_.assign(num_blocks, 0);
  const int64_t s = num_blocks;  // sentinel
  prev_[s] = next_[s] = s;
  for (int64_t b = 0; b < num_blocks; ++b) push_back(b);
}

void BlockAllocator::check_block(int64_t block) const {
  if (block < 0 || block >= num_blocks()) {
    throw std::invalid_argument("block id " + std::to_string(block) + " out of range [0, " +
                                std::to_string(num_blocks()) + ")");
  }
}

void BlockAllocator::unlink(int64_t block) {
  next_[prev_[block]] = next_[block];
  prev_[next_[block]] = prev_[block];
  in_free_[block] = 0;
  --num_free_;
}

void BlockAllocator::push_back(int64_t block) {
  const int64_t s = num_blocks();
  prev_[block] = prev_[s];
  next_[block] = s;
  next_[prev_[s]] = block;
  prev_[s] = block;
  in_free_[block] = 1;
  ++num_free_;
}

void BlockAllocator::drop_hash(int64_t block) {
  if (!has_hash_[block]) return;
  auto it = hash_to_block_.find(hash_[block]);
  if (it != hash_to_block_.end() && it->second == block) hash_to_block_.erase(it);
  has_hash_[block] = 0;
}

std::vector<int64_t> BlockAllocator::allocate(int64_t n) {
  if (n < 0) throw std::invalid_argument("cannot allocate a negative number of blocks");
  if (n > num_free_) {
    throw OutOfBlocks("out of KV-cache blocks: " + std::to_string(n) + " requested, " +
                      std::to_string(num_free_) + " free of " + std::to_string(num_blocks()));
  }
  std::vector<int64_t> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = next_[num_blocks()];  // least recently freed
    unlink(b);
    drop_hash(b);
    refcount_[b] = 1;
    out.push_back(b);
  }
  return out;
}

void BlockAllocator::fork(const std::vector<int64_t>& blocks) {
  for (int64_t b : blocks) {
    check_block(b);
    if (refcount_[b] == 0) throw std::invalid_argument("fork of free block " + std::to_string(b));
  }
  for (int64_t b : blocks) ++refcount_[b];
}

void BlockAllocator::free(const std::vector<int64_t>& blocks) {
  for (int64_t b : blocks) {
    check_block(b);
    if (refcount_[b] <= 0) throw std::invalid_argument("double free of block " + std::to_string(b));
    if (--refcount_[b] == 0) push_back(b);
  }
}

int64_t BlockAllocator::lookup(uint64_t hash) {
  auto it = hash_to_block_.find(hash);
  if (it == hash_to_block_.end()) return -1;
  const int64_t b = it->second;
  if (refcount_[b] == 0) unlink(b);  // revive a cached free block
  ++refcount_[b];
  return b;
}

int64_t BlockAllocator::peek(uint64_t hash) const {
  auto it = hash_to_block_.find(hash);
  return it == hash_to_block_.end() ? -1 : it->second;
}

void BlockAllocator::register_hash(int64_t block, uint64_t hash) {
  check_block(block);
  if (refcount_[block] == 0) throw std::invalid_argument("register_hash on free block " + std::to_string(block));
  if (has_hash_[block] || hash_to_block_.count(hash)) return;
  hash_[block] = hash;
  has_hash_[block] = 1;
  hash_to_block_.emplace(hash, block);
}

void BlockAllocator::reset_prefix_cache() {
  hash_to_block_.clear();
  std::fill(has_hash_.begin(), has_hash_.end(), 0);
}

int64_t BlockAllocator::refcount(int64_t block) const {
  check_block(block);
  return refcount_[block];
}

uint64_t BlockAllocator::hash_tokens(uint64_t parent, const std::vector<int64_t>& tokens) {
  // FNV-1a over the parent hash and the token ids, then a splitmix64 finaliser.
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xffULL;
      h *= 1099511628211ULL;
    }
  };
  mix(parent);
  mix(static_cast<uint64_t>(tokens.size()));
  for (int64_t t : tokens) mix(static_cast<uint64_t>(t));
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebULL;
  h ^= h >> 31;
  return h;
}

}  // namespace elastic_decode
