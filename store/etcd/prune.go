package etcd

import (
	"context"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/audit/engine"
)

var _ engine.Pruner = (*Store)(nil)

// pruneBatch bounds the rows one pruning transaction deletes (etcd takes
// 128 operations in a transaction by default; the digest shard and the
// marker take two).
const pruneBatch = 100

func (s *Store) prunedK() string { return s.p + "a/pruned" }

// PruneRows implements engine.Pruner. The index below which rows may be
// absent is a digested record ("a/pruned"), written with the deletions
// and compared on its revision, so two replicas pruning at once do not
// both move it.
func (s *Store) PruneRows(ctx context.Context, below uint64) (int, error) {
	resp, err := s.get(ctx, s.prunedK())
	if err != nil {
		return 0, err
	}
	var old uint64
	var oldStored []byte
	var rev int64
	if len(resp.Kvs) > 0 {
		oldStored, rev = resp.Kvs[0].Value, resp.Kvs[0].ModRevision
		body, err := s.open(s.prunedK(), oldStored)
		if err != nil {
			return 0, err
		}
		if len(body) != 8 {
			return 0, fmt.Errorf("etcd: malformed %s", s.prunedK())
		}
		old = binary.BigEndian.Uint64(body)
	}
	if below < old {
		below = old
	}
	keep := engine.Keep(below)
	rows, err := s.get(ctx, s.rowK(0), clientv3.WithRange(s.rowK(below)), clientv3.WithKeysOnly(), clientv3.WithLimit(pruneBatch+64))
	if err != nil {
		return 0, err
	}
	w := s.wtx()
	n := 0
	for _, kv := range rows.Kvs {
		i, err := strconv.ParseUint(strings.TrimPrefix(string(kv.Key), s.p+"a/r/"), 16, 64)
		if err != nil {
			return 0, fmt.Errorf("etcd: malformed row key %q", kv.Key)
		}
		if keep(i) {
			continue
		}
		w.ops = append(w.ops, clientv3.OpDelete(string(kv.Key)))
		if n++; n == pruneBatch {
			break
		}
	}
	if below != old {
		if err := w.put(s.prunedK(), oldStored, binary.BigEndian.AppendUint64(nil, below)); err != nil {
			return 0, err
		}
	}
	if len(w.ops) == 0 {
		return 0, nil
	}
	w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(s.prunedK()), "=", rev))
	tr, err := s.send(ctx, w)
	if err != nil {
		return 0, err
	}
	if !tr.Succeeded {
		return 0, fmt.Errorf("etcd: another replica pruned the audit log at the same time; pruning again")
	}
	return n, nil
}

// PrunedBelow implements engine.Pruner.
func (s *Store) PrunedBelow(ctx context.Context) (uint64, error) {
	resp, err := s.get(ctx, s.prunedK())
	if err != nil || len(resp.Kvs) == 0 {
		return 0, err
	}
	body, err := s.open(s.prunedK(), resp.Kvs[0].Value)
	if err != nil {
		return 0, err
	}
	if len(body) != 8 {
		return 0, fmt.Errorf("etcd: malformed %s", s.prunedK())
	}
	return binary.BigEndian.Uint64(body), nil
}
