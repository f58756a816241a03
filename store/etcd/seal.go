package etcd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/kms"
)

// The audit log across replicas.
//
// A transaction that carries audit records writes them as one pending
// group (P a/q/<writer>/<n>) beside the change they record, and compares
// nothing about the log: the transaction's revision, which etcd gives in
// one total order, is the records' place in the log. Sealing turns the
// oldest pending groups, in revision order, into rows (index, chain, tree
// hashes) in one transaction that compares the log's end and that each
// group is still pending, and deletes them. So a record's index is fixed
// by the transaction that commits it, and written down when it is sealed.
//
// Replicas do not race each other for the log's end on the request path
// (they did, one compare-and-swap per group, and three replicas served a
// third of what one did: BENCHMARKS.md, issue 12). The elected "audit"
// leader seals in the background, every SealInterval; any replica seals
// what is pending before it reads the log (Settle), so a read sees every record
// acknowledged before it, on any replica. Sealers that race lose only a retry, off the request path.

func (s *Store) pendingPrefix() string { return s.p + "a/q/" }

// pendingK names a new pending group of this store.
func (s *Store) pendingK() string {
	return fmt.Sprintf("%s%s/%016x", s.pendingPrefix(), s.seal.writer, s.seal.seq.Add(1))
}

// encodePending is a pending group's value: the records' canonical
// encodings (their index and chain not yet set), as a JSON array.
func encodePending(recs []*kms.AuditRecord) string {
	raw := make([]json.RawMessage, len(recs))
	for i, r := range recs {
		c := *r
		c.Index, c.PrevHash = 0, ""
		raw[i] = c.Encode()
	}
	b, err := json.Marshal(raw)
	if err != nil {
		panic("etcd: audit records do not encode: " + err.Error()) // canonical JSON: cannot happen
	}
	return string(b)
}

func decodePending(v []byte) ([]*kms.AuditRecord, error) {
	var raw []json.RawMessage
	if err := json.Unmarshal(v, &raw); err != nil {
		return nil, fmt.Errorf("etcd: malformed pending audit group: %w", err)
	}
	recs := make([]*kms.AuditRecord, len(raw))
	for i, b := range raw {
		r, err := kms.DecodeAuditRecord(b)
		if err != nil {
			return nil, fmt.Errorf("etcd: malformed pending audit record: %w", err)
		}
		recs[i] = r
	}
	return recs, nil
}

type sealer struct {
	writer string        // this store in its pending keys
	seq    atomic.Uint64 // its pending groups
	mu     sync.Mutex    // one seal at a time in this process
	cancel context.CancelFunc
	done   chan struct{}
	rounds atomic.Uint64 // seal transactions committed by this store
}

// sealOps bounds one seal transaction: its rows, its pending deletes and
// the end and head keys, under etcd's default --max-txn-ops of 128.
const sealOps = 120

// SealInterval is how often the leader seals what is pending: under load
// one seal transaction takes every group of the interval (up to sealOps
// operations, then at once the next), instead of one per group.
const SealInterval = 50 * time.Millisecond

// newWriter names this process's pending groups and digest shard.
func newWriter() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func (s *Store) startSealing() {
	s.seal.done = make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	s.seal.cancel = cancel
	go func() {
		defer close(s.seal.done)
		s.Lead(ctx, "audit", func(ctx context.Context) {
			t := time.NewTicker(SealInterval)
			defer t.Stop()
			var warned time.Time
			for {
				// A failing etcd would fail every round: one warning
				// every 10 s, not 20 a second.
				if err := s.sealAll(ctx, 0); err != nil && ctx.Err() == nil && time.Since(warned) > 10*time.Second {
					s.log.Warn("sealing audit records (they stay pending, durable)", "err", err)
					warned = time.Now()
				}
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		})
	}()
}

// stopSealing ends the leader's loop (groups still pending stay durable
// for the next leader).
func (s *Store) stopSealing() {
	if s.seal.cancel != nil {
		s.seal.cancel()
		<-s.seal.done
	}
}

// Settle implements engine.Settler: every group pending when it starts is
// sealed when it returns.
func (s *Store) Settle(ctx context.Context) error {
	resp, err := s.get(ctx, s.p+"ping")
	if err != nil {
		return err
	}
	return s.sealAll(ctx, resp.Header.Revision)
}

// sealAll seals pending groups, oldest first, until none is left that
// commited at or before upTo (0: none at all), retrying lost races for
// retryBudget.
func (s *Store) sealAll(ctx context.Context, upTo int64) error {
	s.seal.mu.Lock()
	defer s.seal.mu.Unlock()
	start := time.Now()
	for {
		more, err := s.sealOnce(ctx, upTo)
		switch {
		case errors.Is(err, engine.ErrConflict):
			if time.Since(start) > retryBudget {
				return fmt.Errorf("audit: sealing lost %v of races to other replicas: %w", retryBudget, err)
			}
			backoff()
		case err != nil:
			return err
		case !more:
			return nil
		}
	}
}

// sealOnce seals the oldest pending groups that fit one transaction and
// reports whether more may wait.
func (s *Store) sealOnce(ctx context.Context, upTo int64) (bool, error) {
	opts := []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend), clientv3.WithLimit(sealOps)}
	if upTo > 0 {
		opts = append(opts, clientv3.WithMaxCreateRev(upTo))
	}
	resp, err := s.get(ctx, s.pendingPrefix(), opts...)
	if err != nil {
		return false, err
	}
	var recs []*kms.AuditRecord
	var taken []*mvccpb.KeyValue
	for _, kv := range resp.Kvs {
		body, err := s.open(string(kv.Key), kv.Value)
		if err != nil {
			return false, err
		}
		rs, err := decodePending(body)
		if err != nil {
			return false, fmt.Errorf("%w (%s)", err, kv.Key)
		}
		if len(taken) > 0 && len(recs)+len(rs)+len(taken)+1+2 > sealOps {
			break
		}
		recs = append(recs, rs...)
		taken = append(taken, kv)
	}
	if len(taken) == 0 {
		return false, nil
	}
	more := len(taken) < len(resp.Kvs) || resp.More
	err = s.audit.Seal(ctx, recs, func(first uint64, rows [][]byte, head []byte) ([]byte, error) {
		// The end and the head as they are: the transaction overwrites
		// them (so the digest needs what they held) and compares they
		// did not change; the end must be where the engine starts.
		cur, err := s.get(ctx, s.endK(), clientv3.WithRange(s.headK()+"\x00"))
		if err != nil {
			return nil, err
		}
		w := s.wtx()
		var end, oldHead []byte
		var endRev, headRev int64
		for _, kv := range cur.Kvs {
			switch string(kv.Key) {
			case s.endK():
				end, endRev = kv.Value, kv.ModRevision
			case s.headK():
				oldHead, headRev = kv.Value, kv.ModRevision
			}
		}
		if end == nil && first != 0 {
			return nil, engine.ErrConflict
		}
		if end != nil {
			n, err := s.parseEnd(end)
			if err != nil {
				return nil, err
			}
			if n != first {
				found, err := s.ReadHead(ctx)
				if err != nil {
					return nil, err
				}
				return found, engine.ErrConflict
			}
		}
		w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(s.endK()), "=", endRev), clientv3.Compare(clientv3.ModRevision(s.headK()), "=", headRev))
		for i, row := range rows {
			// A row is written once: never over one already there (an
			// end put back must not overwrite acknowledged rows).
			w.cmps = append(w.cmps, clientv3.Compare(clientv3.CreateRevision(s.rowK(first+uint64(i))), "=", 0))
			if err := w.put(s.rowK(first+uint64(i)), nil, row); err != nil {
				return nil, err
			}
		}
		if err := w.put(s.endK(), end, []byte(hex16(first+uint64(len(rows))))); err != nil {
			return nil, err
		}
		if err := w.put(s.headK(), oldHead, head); err != nil {
			return nil, err
		}
		for _, kv := range taken {
			// Still pending: not sealed meanwhile by another replica.
			w.cmps = append(w.cmps, clientv3.Compare(clientv3.CreateRevision(string(kv.Key)), "=", kv.CreateRevision))
			if err := w.del(string(kv.Key), kv.Value); err != nil {
				return nil, err
			}
		}
		tctx, cancel := s.ctx(ctx)
		defer cancel()
		// If a compare fails, the log's head comes back: the next try
		// starts where the log ends without reading rows.
		tr, err := s.send(tctx, w, clientv3.OpGet(s.headK()))
		if err != nil {
			return nil, err
		}
		if !tr.Succeeded {
			var found []byte
			if len(tr.Responses) == 1 {
				if kvs := tr.Responses[0].GetResponseRange().GetKvs(); len(kvs) == 1 {
					if found, err = s.open(s.headK(), kvs[0].Value); err != nil {
						return nil, err
					}
				}
			}
			return found, engine.ErrConflict
		}
		s.seal.rounds.Add(1)
		return nil, nil
	})
	return more, err
}
