package storetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
)

// Recording is a store.Sink that keeps what it was sent, in order, as
// comparable lines.
type Recording struct{ Lines []string }

func (r *Recording) add(kind string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	r.Lines = append(r.Lines, kind+" "+string(b))
	return nil
}

func (r *Recording) Meta(name string, value []byte) error { return r.add("meta", []any{name, value}) }
func (r *Recording) Key(k *kms.Key) error                 { return r.add("key", k) }
func (r *Recording) Version(key string, v *kms.Version) error {
	return r.add("version", []any{key, v})
}
func (r *Recording) Token(t *kms.Token) error { return r.add("token", t) }
func (r *Recording) AuditRow(i uint64, row []byte) error {
	return r.add("row", []any{i, row})
}
func (r *Recording) AuditEnd(end, pruned uint64) error { return r.add("end", []uint64{end, pruned}) }
func (r *Recording) Checkpoint(size uint64, note []byte) error {
	return r.add("checkpoint", []any{size, note})
}
func (r *Recording) Pending(recs [][]byte) error { return r.add("pending", recs) }

// Replay sends a recording to a Sink.
func (r *Recording) Replay(to store.Sink) error {
	for _, l := range r.Lines {
		var kind string
		var rest []byte
		for i := range l {
			if l[i] == ' ' {
				kind, rest = l[:i], []byte(l[i+1:])
				break
			}
		}
		var err error
		switch kind {
		case "meta":
			var v struct {
				Name  string
				Value []byte
			}
			var a []json.RawMessage
			if err = json.Unmarshal(rest, &a); err == nil {
				_ = json.Unmarshal(a[0], &v.Name)
				_ = json.Unmarshal(a[1], &v.Value)
				err = to.Meta(v.Name, v.Value)
			}
		case "key":
			var k kms.Key
			if err = json.Unmarshal(rest, &k); err == nil {
				err = to.Key(&k)
			}
		case "version":
			var a []json.RawMessage
			var name string
			var v kms.Version
			if err = json.Unmarshal(rest, &a); err == nil {
				_ = json.Unmarshal(a[0], &name)
				if err = json.Unmarshal(a[1], &v); err == nil {
					err = to.Version(name, &v)
				}
			}
		case "token":
			var t kms.Token
			if err = json.Unmarshal(rest, &t); err == nil {
				err = to.Token(&t)
			}
		case "row":
			var a []json.RawMessage
			var i uint64
			var row []byte
			if err = json.Unmarshal(rest, &a); err == nil {
				_ = json.Unmarshal(a[0], &i)
				_ = json.Unmarshal(a[1], &row)
				err = to.AuditRow(i, row)
			}
		case "end":
			var e []uint64
			if err = json.Unmarshal(rest, &e); err == nil {
				err = to.AuditEnd(e[0], e[1])
			}
		case "checkpoint":
			var a []json.RawMessage
			var n uint64
			var note []byte
			if err = json.Unmarshal(rest, &a); err == nil {
				_ = json.Unmarshal(a[0], &n)
				_ = json.Unmarshal(a[1], &note)
				err = to.Checkpoint(n, note)
			}
		case "pending":
			var recs [][]byte
			if err = json.Unmarshal(rest, &recs); err == nil {
				err = to.Pending(recs)
			}
		default:
			err = fmt.Errorf("recording: line %q", l)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Target is an empty store a dump is loaded into: its Loader, and how to
// open it once loaded.
type Target struct {
	Loader store.Loader
	Sealer kms.Sealer
	Open   func(t *testing.T) store.Backend
}

// RunDump checks a driver's Dump and Load: a store with keys, versions
// (one with blobs, one scheduled for destruction), tokens, metadata, an
// audit log pruned below an index and a checkpoint dumps the same after a
// load into an empty target as before; the target's indexes are rebuilt,
// it passes its scrub, its log has the same root and goes on; a second
// load into it is refused and changes nothing.
func RunDump(t *testing.T, open func(t *testing.T) store.Backend, target func(t *testing.T) Target) {
	ctx := context.Background()
	s := open(t)
	create(t, s, "alpha")
	create(t, s, "beta")
	if err := rotate(s, "alpha"); err != nil {
		t.Fatal(err)
	}
	at := t0.Add(24 * time.Hour)
	err := s.UpdateKey(ctx, "beta", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
		v := version(2)
		v.Blobs = []string{"sha256:" + fmt.Sprintf("%064x", 7)}
		if err := tx.AddVersion(v); err != nil {
			return nil, err
		}
		tx.Key().Primary = 2
		v1, err := tx.Version(1)
		if err != nil {
			return nil, err
		}
		v1.State, v1.DestroyAt = kms.StateDestroyScheduled, &at
		return []*kms.AuditRecord{{Time: t0.Format(time.RFC3339Nano), Actor: "t", Operation: "POST /x", Status: 200}}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i, role := range []kms.Role{kms.RoleAdmin, kms.RoleWorker} {
		tok := &kms.Token{ID: fmt.Sprintf("tok%d", i), Role: role, Keys: []string{"*"}, Hash: []byte(fmt.Sprintf("hash%d", i)), CreatedAt: t0}
		if err := s.CreateToken(ctx, tok, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.PutMeta("sealed-under", []byte(`{"id":"x"}`)); err != nil {
		t.Fatal(err)
	}
	l := s.Audit()
	for i := range 70 {
		if err := l.AppendAudit(ctx, &kms.AuditRecord{Time: t0.Format(time.RFC3339Nano), Actor: "t", Operation: fmt.Sprintf("GET /%d", i), Status: 200}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.PutCheckpoint(ctx, 64, []byte("note of 64")); err != nil {
		t.Fatal(err)
	}
	if _, err := l.AuditSize(ctx); err != nil { // the journal's rows into the store
		t.Fatal(err)
	}
	if p, ok := any(s).(engine.Pruner); ok {
		if _, err := p.PruneRows(ctx, 40); err != nil {
			t.Fatal(err)
		}
	}
	size, err := l.AuditSize(ctx)
	if err != nil {
		t.Fatal(err)
	}
	root, err := l.TrustedRoot(ctx, size)
	if err != nil {
		t.Fatal(err)
	}
	var before Recording
	if err := s.(store.Dumper).Dump(ctx, &before); err != nil {
		t.Fatal(err)
	}
	if n := len(before.Lines); n < 10 {
		t.Fatalf("the dump holds %d records", n)
	}

	tg := target(t)
	if err := tg.Loader.Load(ctx, tg.Sealer, before.Replay, nil); err != nil {
		t.Fatal(err)
	}
	s2 := tg.Open(t)
	var after Recording
	if err := s2.(store.Dumper).Dump(ctx, &after); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(before.Lines, after.Lines) {
		t.Fatalf("the loaded store dumps otherwise:\nbefore %d lines\n%q\nafter %d lines\n%q", len(before.Lines), before.Lines, len(after.Lines), after.Lines)
	}
	if due, err := s2.DueVersions(ctx, at, 10); err != nil || len(due) != 1 || due[0] != (kms.VersionRef{Key: "beta", Version: 1}) {
		t.Fatalf("the destroy schedule after a load: %v %v", due, err)
	}
	if owner, err := s2.BlobOwner(ctx, "sha256:"+fmt.Sprintf("%064x", 7)); err != nil || owner != "beta" {
		t.Fatalf("the blob index after a load: %q %v", owner, err)
	}
	if _, err := s2.Scrub(ctx); err != nil {
		t.Fatalf("the loaded store fails its scrub: %v", err)
	}
	l2 := s2.Audit()
	if n, err := l2.AuditSize(ctx); err != nil || n != size {
		t.Fatalf("the loaded log has %d records (%v), want %d", n, err, size)
	}
	if r, err := l2.TrustedRoot(ctx, size); err != nil || r != root {
		t.Fatalf("the loaded log's root: %v %v", r, err)
	}
	if err := l2.AppendAudit(ctx, &kms.AuditRecord{Time: t0.Format(time.RFC3339Nano), Actor: "t", Operation: "GET /after", Status: 200}); err != nil {
		t.Fatal(err)
	}
	if n, err := l2.AuditSize(ctx); err != nil || n != size+1 {
		t.Fatalf("the loaded log does not go on: %d %v", n, err)
	}
	if err := tg.Loader.Load(ctx, tg.Sealer, before.Replay, nil); err == nil {
		t.Fatal("a load into a store that holds records was taken")
	}
	var again Recording
	if err := s2.(store.Dumper).Dump(ctx, &again); err != nil {
		t.Fatal(err)
	}
	if len(again.Lines) != len(after.Lines)+1 {
		t.Fatalf("a refused load changed the store: %d lines, want %d", len(again.Lines), len(after.Lines)+1)
	}
	// A feed that fails leaves an empty target a load can fill.
	tg2 := target(t)
	boom := errors.New("the backup ends here")
	err = tg2.Loader.Load(ctx, tg2.Sealer, func(to store.Sink) error {
		var half Recording
		half.Lines = before.Lines[:len(before.Lines)/2]
		if err := half.Replay(to); err != nil {
			return err
		}
		return boom
	}, nil)
	if !errors.Is(err, boom) {
		t.Fatalf("a failed feed: %v", err)
	}
	if err := tg2.Loader.Load(ctx, tg2.Sealer, before.Replay, nil); err != nil {
		t.Fatalf("a load after a failed one: %v", err)
	}
}
