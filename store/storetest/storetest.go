// Package storetest is the conformance suite every kms.Store runs: the bbolt
// store now, a distributed one later.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/kms"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func key(name string) *kms.Key {
	return &kms.Key{Name: name, Kind: "ml-dsa-65", CreatedAt: t0, Primary: 1, Latest: 1, MinDecryptionVersion: 1,
		Policy: kms.Policy{DestroyWaitDays: 30}}
}

func version(n uint64) *kms.Version {
	return &kms.Version{Number: n, State: kms.StateEnabled, CreatedAt: t0, PublicKey: []byte(fmt.Sprintf("pub%d", n)), Sealed: []byte("sealed")}
}

// create stores a key with version 1 or fails the test.
func create(t *testing.T, s kms.Store, name string) {
	t.Helper()
	if err := s.CreateKey(context.Background(), key(name), version(1), nil); err != nil {
		t.Fatal(err)
	}
}

// rotate adds a version to a key through UpdateKey.
func rotate(s kms.Store, name string) error {
	return s.UpdateKey(context.Background(), name, func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
		k := tx.Key()
		if err := tx.AddVersion(version(k.Latest + 1)); err != nil {
			return nil, err
		}
		k.Primary = k.Latest
		return nil, nil
	})
}

// watched records what the store's change feed reports.
type watched struct {
	mu  sync.Mutex
	chs []kms.Change
}

func (w *watched) take() []kms.Change {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.chs
	w.chs = nil
	return c
}

func watch(s kms.Store) *watched {
	w := &watched{}
	s.Watch(func(chs []kms.Change) {
		w.mu.Lock()
		w.chs = append(w.chs, chs...)
		w.mu.Unlock()
	})
	return w
}

// Run runs the suite; open returns a new, empty store.
func Run(t *testing.T, open func(t *testing.T) kms.Store) {
	ctx := context.Background()

	t.Run("CreateGet", func(t *testing.T) {
		s := open(t)
		w := watch(s)
		create(t, s, "a")
		if got := w.take(); !slices.Equal(got, []kms.Change{{Key: "a"}, {Key: "a", Version: 1}}) {
			t.Fatalf("changes reported for a new key: %v", got)
		}
		got, err := s.GetKey(ctx, "a")
		if err != nil || got.Name != "a" || got.Latest != 1 || !got.CreatedAt.Equal(t0) {
			t.Fatalf("GetKey: %+v %v", got, err)
		}
		v, err := s.GetVersion(ctx, "a", 1)
		if err != nil || v.Number != 1 || string(v.Sealed) != "sealed" || string(v.PublicKey) != "pub1" {
			t.Fatalf("GetVersion: %+v %v", v, err)
		}
		if err := s.CreateKey(ctx, key("a"), version(1), nil); !errors.Is(err, kms.ErrAlreadyExists) {
			t.Fatalf("second CreateKey: %v", err)
		}
		if len(w.take()) != 0 {
			t.Fatal("a refused CreateKey reported changes")
		}
		if _, err := s.GetKey(ctx, "b"); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("GetKey of a missing key: %v", err)
		}
		for _, n := range []uint64{0, 2} {
			if _, err := s.GetVersion(ctx, "a", n); !errors.Is(err, kms.ErrNotFound) {
				t.Fatalf("GetVersion %d: %v", n, err)
			}
		}
		if _, err := s.GetVersion(ctx, "b", 1); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("GetVersion of a missing key: %v", err)
		}
		if err := s.CreateKey(ctx, key("c"), version(2), nil); err == nil {
			t.Fatal("a key was created with version 2 only")
		}
	})

	t.Run("GetReturnsACopy", func(t *testing.T) {
		s := open(t)
		create(t, s, "a")
		k, _ := s.GetKey(ctx, "a")
		k.Primary = 9
		v, _ := s.GetVersion(ctx, "a", 1)
		v.Sealed[0] = 'X'
		again, _ := s.GetKey(ctx, "a")
		v2, _ := s.GetVersion(ctx, "a", 1)
		if again.Primary != 1 || string(v2.Sealed) != "sealed" {
			t.Fatal("changing a returned key or version changed the store")
		}
	})

	t.Run("UpdateCommitsOrNothing", func(t *testing.T) {
		s := open(t)
		create(t, s, "a")
		w := watch(s)
		boom := errors.New("boom")
		err := s.UpdateKey(ctx, "a", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			tx.Key().Primary = 2
			if err := tx.AddVersion(version(2)); err != nil {
				return nil, err
			}
			v, _ := tx.Version(1)
			v.State = kms.StateDisabled
			return nil, boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("UpdateKey returned %v, want fn's error", err)
		}
		k, _ := s.GetKey(ctx, "a")
		v, _ := s.GetVersion(ctx, "a", 1)
		if k.Primary != 1 || k.Latest != 1 || v.State != kms.StateEnabled {
			t.Fatal("a failed update changed the key")
		}
		if _, err := s.GetVersion(ctx, "a", 2); !errors.Is(err, kms.ErrNotFound) {
			t.Fatal("a failed update left a version")
		}
		if len(w.take()) != 0 {
			t.Fatal("a failed update reported changes")
		}
		if err := rotate(s, "a"); err != nil {
			t.Fatal(err)
		}
		if k, _ := s.GetKey(ctx, "a"); k.Primary != 2 || k.Latest != 2 {
			t.Fatalf("update lost: %+v", k)
		}
		if got := w.take(); !slices.Equal(got, []kms.Change{{Key: "a"}, {Key: "a", Version: 2}}) {
			t.Fatalf("changes reported for a rotation: %v", got)
		}
		// A version changed through the transaction is written back.
		if err := s.UpdateKey(ctx, "a", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			v, err := tx.Version(1)
			if err != nil {
				return nil, err
			}
			v.State = kms.StateDisabled
			return nil, nil
		}); err != nil {
			t.Fatal(err)
		}
		if v, _ := s.GetVersion(ctx, "a", 1); v.State != kms.StateDisabled {
			t.Fatal("a version change was lost")
		}
		if got := w.take(); !slices.Equal(got, []kms.Change{{Key: "a"}, {Key: "a", Version: 1}}) {
			t.Fatalf("changes reported for a version change: %v", got)
		}
		for name, fn := range map[string]func(kms.KeyTx) ([]*kms.AuditRecord, error){
			"missing key": nil,
			"rename":      func(tx kms.KeyTx) ([]*kms.AuditRecord, error) { tx.Key().Name = "b"; return nil, nil },
			"latest":      func(tx kms.KeyTx) ([]*kms.AuditRecord, error) { tx.Key().Latest = 7; return nil, nil },
			"primary":     func(tx kms.KeyTx) ([]*kms.AuditRecord, error) { tx.Key().Primary = 3; return nil, nil },
			"gap":         func(tx kms.KeyTx) ([]*kms.AuditRecord, error) { return nil, tx.AddVersion(version(4)) },
			"no version": func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
				_, err := tx.Version(3)
				return nil, err
			},
		} {
			target := "a"
			if fn == nil {
				target, fn = "zz", func(kms.KeyTx) ([]*kms.AuditRecord, error) { return nil, nil }
			}
			if err := s.UpdateKey(ctx, target, fn); err == nil {
				t.Fatalf("%s: the update was accepted", name)
			} else if name == "missing key" || name == "no version" {
				if !errors.Is(err, kms.ErrNotFound) {
					t.Fatalf("%s: %v, want not found", name, err)
				}
			}
		}
		if k, _ := s.GetKey(ctx, "a"); k.Primary != 2 || k.Latest != 2 || k.Name != "a" {
			t.Fatalf("a refused update changed the key: %+v", k)
		}
	})

	t.Run("UpdatesSerialize", func(t *testing.T) {
		s := open(t)
		create(t, s, "a")
		var wg sync.WaitGroup
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rotate(s, "a")
			}()
		}
		wg.Wait()
		if k, _ := s.GetKey(ctx, "a"); k.Latest != 21 {
			t.Fatalf("%d versions after 20 concurrent appends, want 21 (lost update)", k.Latest)
		}
		for n := uint64(1); n <= 21; n++ {
			if v, err := s.GetVersion(ctx, "a", n); err != nil || string(v.PublicKey) != fmt.Sprintf("pub%d", n) {
				t.Fatalf("version %d: %+v %v", n, v, err)
			}
		}
	})

	t.Run("ListVersionsPages", func(t *testing.T) {
		s := open(t)
		create(t, s, "a")
		create(t, s, "a0") // a name with a as prefix must not mix in
		rotate(s, "a0")
		for i := 0; i < 9; i++ {
			if err := rotate(s, "a"); err != nil {
				t.Fatal(err)
			}
		}
		var got []uint64
		for before := uint64(0); ; {
			k, vs, err := s.ListVersions(ctx, "a", before, 4)
			if err != nil {
				t.Fatal(err)
			}
			if k == nil || k.Name != "a" || k.Latest != 10 {
				t.Fatalf("ListVersions' header: %+v", k)
			}
			for _, v := range vs {
				got = append(got, v.Number)
				before = v.Number
			}
			if len(vs) < 4 {
				break
			}
		}
		if !slices.Equal(got, []uint64{10, 9, 8, 7, 6, 5, 4, 3, 2, 1}) {
			t.Fatalf("listed versions %v", got)
		}
		if _, vs, _ := s.ListVersions(ctx, "a", 100, 2); len(vs) != 2 || vs[0].Number != 10 {
			t.Fatalf("ListVersions below a number past the latest: %v", vs)
		}
		if _, vs, _ := s.ListVersions(ctx, "a", 1, 2); len(vs) != 0 {
			t.Fatalf("ListVersions below 1: %v", vs)
		}
		if _, _, err := s.ListVersions(ctx, "zz", 0, 2); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("ListVersions of a missing key: %v", err)
		}
	})

	t.Run("DueVersions", func(t *testing.T) {
		s := open(t)
		for _, name := range []string{"a", "b"} {
			create(t, s, name)
			for i := 0; i < 3; i++ {
				rotate(s, name)
			}
		}
		schedule := func(name string, n uint64, at *time.Time, st kms.State) {
			t.Helper()
			if err := s.UpdateKey(ctx, name, func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
				v, err := tx.Version(n)
				if err != nil {
					return nil, err
				}
				v.State, v.DestroyAt = st, at
				return nil, nil
			}); err != nil {
				t.Fatal(err)
			}
		}
		day := func(d int) *time.Time { x := t0.AddDate(0, 0, d); return &x }
		schedule("a", 2, day(3), kms.StateDestroyScheduled)
		schedule("b", 1, day(1), kms.StateDestroyScheduled)
		schedule("b", 3, day(2), kms.StateDestroyScheduled)
		schedule("a", 1, day(5), kms.StateDestroyScheduled)
		schedule("a", 1, nil, kms.StateDisabled)            // cancelled: leaves the schedule
		schedule("b", 3, day(4), kms.StateDestroyScheduled) // moved
		due, err := s.DueVersions(ctx, *day(10), 10)
		want := []kms.VersionRef{{Key: "b", Version: 1}, {Key: "a", Version: 2}, {Key: "b", Version: 3}}
		if err != nil || !slices.Equal(due, want) {
			t.Fatalf("DueVersions = %v %v, want %v", due, err, want)
		}
		if due, _ := s.DueVersions(ctx, *day(3), 10); !slices.Equal(due, want[:2]) {
			t.Fatalf("DueVersions at day 3 = %v", due)
		}
		if due, _ := s.DueVersions(ctx, *day(10), 1); !slices.Equal(due, want[:1]) {
			t.Fatalf("DueVersions limited to 1 = %v", due)
		}
		schedule("b", 1, nil, kms.StateDestroyed)
		if due, _ := s.DueVersions(ctx, *day(10), 10); !slices.Equal(due, want[1:]) {
			t.Fatalf("DueVersions after a destruction = %v", due)
		}
	})

	t.Run("ListOrderAndPages", func(t *testing.T) {
		s := open(t)
		for _, n := range []string{"c", "a", "b", "d"} {
			create(t, s, n)
		}
		var got string
		after := ""
		for {
			ks, err := s.ListKeys(ctx, after, 3)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range ks {
				got += k.Name
				after = k.Name
			}
			if len(ks) < 3 {
				break
			}
		}
		if got != "abcd" {
			t.Fatalf("listed %q, want abcd", got)
		}
		if ks, _ := s.ListKeys(ctx, "bb", 10); len(ks) != 2 || ks[0].Name != "c" {
			t.Fatalf("ListKeys after a name between keys: %v", ks)
		}
	})

	t.Run("Tokens", func(t *testing.T) {
		s := open(t)
		w := watch(s)
		if n, _ := s.CountTokens(ctx); n != 0 {
			t.Fatalf("%d tokens in a new store", n)
		}
		for i := 0; i < 3; i++ {
			tok := &kms.Token{ID: fmt.Sprintf("%016d", i), Role: kms.RoleWorker, Keys: []string{"*"}, Hash: []byte{byte(i)}}
			if err := s.CreateToken(ctx, tok, nil); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.CreateToken(ctx, &kms.Token{ID: fmt.Sprintf("%016d", 1)}, nil); !errors.Is(err, kms.ErrAlreadyExists) {
			t.Fatalf("duplicate token id: %v", err)
		}
		if got := w.take(); len(got) != 3 || got[2] != (kms.Change{Token: fmt.Sprintf("%016d", 2)}) {
			t.Fatalf("changes reported for 3 new tokens: %v", got)
		}
		if n, _ := s.CountTokens(ctx); n != 3 {
			t.Fatalf("CountTokens = %d", n)
		}
		got, err := s.GetToken(ctx, fmt.Sprintf("%016d", 2))
		if err != nil || got.Hash[0] != 2 || got.Role != kms.RoleWorker {
			t.Fatalf("GetToken: %+v %v", got, err)
		}
		if _, err := s.GetToken(ctx, "nope"); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("GetToken of a missing id: %v", err)
		}
		page, err := s.ListTokens(ctx, "", 2)
		if err != nil || len(page) != 2 || page[0].ID != fmt.Sprintf("%016d", 0) {
			t.Fatalf("ListTokens first page: %v %v", page, err)
		}
		if rest, _ := s.ListTokens(ctx, page[1].ID, 2); len(rest) != 1 || rest[0].ID != fmt.Sprintf("%016d", 2) {
			t.Fatalf("ListTokens second page: %v", rest)
		}
		// UpdateToken: fn's error changes nothing; a success stores.
		id := fmt.Sprintf("%016d", 1)
		boom := errors.New("boom")
		if err := s.UpdateToken(ctx, id, func(t *kms.Token) ([]*kms.AuditRecord, error) {
			t.Name = "changed"
			return nil, boom
		}); !errors.Is(err, boom) {
			t.Fatalf("UpdateToken with a failing fn: %v", err)
		}
		if got, _ := s.GetToken(ctx, id); got.Name != "" {
			t.Fatal("a failed UpdateToken changed the token")
		}
		now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
		if err := s.UpdateToken(ctx, id, func(t *kms.Token) ([]*kms.AuditRecord, error) {
			t.RevokedAt = &now
			return nil, nil
		}); err != nil {
			t.Fatal(err)
		}
		if got, _ := s.GetToken(ctx, id); got.RevokedAt == nil || !got.RevokedAt.Equal(now) {
			t.Fatalf("UpdateToken did not store: %+v", got)
		}
		if got := w.take(); !slices.Equal(got, []kms.Change{{Token: id}}) {
			t.Fatalf("changes reported for a revocation: %v", got)
		}
		if err := s.UpdateToken(ctx, "nope", func(*kms.Token) ([]*kms.AuditRecord, error) { return nil, nil }); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("UpdateToken of a missing id: %v", err)
		}
		// RecordTokenUse keeps the latest time and skips missing tokens.
		later := now.Add(time.Hour)
		if err := s.RecordTokenUse(ctx, map[string]time.Time{id: later, "nope": later}); err != nil {
			t.Fatal(err)
		}
		if err := s.RecordTokenUse(ctx, map[string]time.Time{id: now}); err != nil {
			t.Fatal(err)
		}
		if got, _ := s.GetToken(ctx, id); got.LastUsedAt == nil || !got.LastUsedAt.Equal(later) {
			t.Fatalf("RecordTokenUse: %+v", got.LastUsedAt)
		}
		if got := w.take(); !slices.Equal(got, []kms.Change{{Token: id}}) {
			t.Fatalf("changes reported for token use: %v", got)
		}
	})

	t.Run("CreateFirstToken", func(t *testing.T) {
		// Replicas starting at once on an empty store: one bootstrap
		// token, whoever races.
		s := open(t)
		var wg sync.WaitGroup
		errs := make([]error, 8)
		for i := range errs {
			wg.Go(func() {
				errs[i] = s.CreateFirstToken(ctx, &kms.Token{ID: fmt.Sprintf("first%011d", i), Role: kms.RoleAdmin, Keys: []string{"*"}}, nil)
			})
		}
		wg.Wait()
		made := 0
		for _, err := range errs {
			switch {
			case err == nil:
				made++
			case !errors.Is(err, kms.ErrAlreadyExists):
				t.Fatalf("CreateFirstToken lost a race with %v, want ErrAlreadyExists", err)
			}
		}
		if n, _ := s.CountTokens(ctx); made != 1 || n != 1 {
			t.Fatalf("8 racing CreateFirstToken made %d tokens (%d stored), want 1", made, n)
		}
		if err := s.CreateFirstToken(ctx, &kms.Token{ID: "later0000000000x"}, nil); !errors.Is(err, kms.ErrAlreadyExists) {
			t.Fatalf("CreateFirstToken with a token stored: %v", err)
		}
	})
	t.Run("BlobOwner", func(t *testing.T) {
		s := open(t)
		if _, err := s.BlobOwner(ctx, "sha256:none"); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("an unknown blob: %v, want ErrNotFound", err)
		}
		v1 := version(1)
		v1.Blobs = []string{"sha256:a1", "sha256:a2"}
		if err := s.CreateKey(ctx, key("he-a"), v1, nil); err != nil {
			t.Fatal(err)
		}
		// A version added by an update is indexed in the same transaction;
		// an update that fails indexes nothing.
		err := s.UpdateKey(ctx, "he-a", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			k := tx.Key()
			v := version(k.Latest + 1)
			v.Blobs = []string{"sha256:never"}
			if err := tx.AddVersion(v); err != nil {
				return nil, err
			}
			return nil, errors.New("refused")
		})
		if err == nil {
			t.Fatal("the failing update succeeded")
		}
		if _, err := s.BlobOwner(ctx, "sha256:never"); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("a blob of a rolled-back version is indexed: %v", err)
		}
		if err := s.UpdateKey(ctx, "he-a", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			k := tx.Key()
			v := version(k.Latest + 1)
			v.Blobs = []string{"sha256:a3"}
			if err := tx.AddVersion(v); err != nil {
				return nil, err
			}
			k.Primary = k.Latest // AddVersion advanced Latest
			return nil, nil
		}); err != nil {
			t.Fatal(err)
		}
		v := version(1)
		v.Blobs = []string{"sha256:b1"}
		if err := s.CreateKey(ctx, key("he-b"), v, nil); err != nil {
			t.Fatal(err)
		}
		for digest, owner := range map[string]string{"sha256:a1": "he-a", "sha256:a2": "he-a", "sha256:a3": "he-a", "sha256:b1": "he-b"} {
			if got, err := s.BlobOwner(ctx, digest); err != nil || got != owner {
				t.Errorf("BlobOwner(%s) = %q, %v; want %q", digest, got, err, owner)
			}
		}
	})

	t.Run("Ping", func(t *testing.T) {
		if err := open(t).Ping(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

// RunAudit runs the audit-log part of the suite on a store that is also a
// kms.AuditStore.
func RunAudit(t *testing.T, open func(t *testing.T) interface {
	kms.Store
	kms.AuditStore
}) {
	ctx := context.Background()
	rec := func(op string) *kms.AuditRecord {
		return &kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "t", Operation: op, Status: 200}
	}

	t.Run("AppendAssignsIndexAndChain", func(t *testing.T) {
		s := open(t)
		for i := 0; i < 5; i++ {
			r := rec(fmt.Sprintf("op%d", i))
			if err := s.AppendAudit(ctx, r); err != nil {
				t.Fatal(err)
			}
			// Index is set here by a store that fixes it at commit; a
			// replicated store fixes the order at commit and writes the
			// index when it seals the record (read back below).
			if !r.Committed || (r.Index != 0 && r.Index != uint64(i)) {
				t.Fatalf("record %d: committed %v index %d", i, r.Committed, r.Index)
			}
		}
		if n, _ := s.AuditSize(ctx); n != 5 {
			t.Fatalf("size %d", n)
		}
		all, err := s.AuditRecords(ctx, 0, 5)
		if err != nil || len(all) != 5 {
			t.Fatalf("AuditRecords(0,5): %d %v", len(all), err)
		}
		recs := make([]*kms.AuditRecord, 5)
		for i, b := range all {
			if recs[i], err = kms.DecodeAuditRecord(b); err != nil || recs[i].Index != uint64(i) || recs[i].Operation != fmt.Sprintf("op%d", i) {
				t.Fatalf("record %d: %+v %v (appended one after another, so in this order)", i, recs[i], err)
			}
		}
		got, err := s.AuditRecords(ctx, 1, 4)
		if err != nil || len(got) != 3 || string(got[0]) != string(all[1]) {
			t.Fatalf("AuditRecords(1,4): %q %v", got, err)
		}
		if _, err := s.AuditRecords(ctx, 3, 6); !errors.Is(err, kms.ErrInvalid) {
			t.Fatalf("records past the end: %v", err)
		}
		if recs[0].PrevHash != "" || recs[1].PrevHash == "" || recs[1].PrevHash == recs[2].PrevHash {
			t.Fatalf("prev hashes: %q %q %q", recs[0].PrevHash, recs[1].PrevHash, recs[2].PrevHash)
		}
	})

	t.Run("ChangeAndRecordCommitTogether", func(t *testing.T) {
		s := open(t)
		r := rec("create")
		if err := s.CreateKey(ctx, key("a"), version(1), []*kms.AuditRecord{r}); err != nil || !r.Committed {
			t.Fatalf("create: %v %v", err, r.Committed)
		}
		// A failing change leaves neither the change nor its record.
		r2 := rec("update")
		err := s.UpdateKey(ctx, "a", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			tx.Key().Policy.DestroyWaitDays = 7
			return []*kms.AuditRecord{r2}, errors.New("refused")
		})
		if err == nil || r2.Committed {
			t.Fatal("a refused update committed its record")
		}
		if n, _ := s.AuditSize(ctx); n != 1 {
			t.Fatalf("size %d after a refused update, want 1", n)
		}
		// A duplicate create appends nothing.
		if err := s.CreateKey(ctx, key("a"), version(1), []*kms.AuditRecord{rec("dup")}); err == nil {
			t.Fatal("duplicate create")
		}
		r3 := rec("update")
		if err := s.UpdateKey(ctx, "a", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			tx.Key().Policy.DestroyWaitDays = 7
			return []*kms.AuditRecord{r3}, nil
		}); err != nil || !r3.Committed {
			t.Fatalf("update: %v %+v", err, r3)
		}
		if n, _ := s.AuditSize(ctx); n != 2 {
			t.Fatalf("size %d, want 2", n)
		}
		if b, err := s.AuditRecords(ctx, 1, 2); err != nil || len(b) != 1 {
			t.Fatalf("record 1: %v", err)
		} else if r, err := kms.DecodeAuditRecord(b[0]); err != nil || r.Index != 1 || r.Operation != "update" {
			t.Fatalf("record 1: %+v %v, want the update", r, err)
		}
	})

	t.Run("ConcurrentAppendsShareCommits", func(t *testing.T) {
		s := open(t)
		var wg sync.WaitGroup
		for i := 0; i < 200; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				if err := s.AppendAudit(ctx, rec(fmt.Sprint(i))); err != nil {
					t.Error(err)
				}
			}(i)
		}
		wg.Wait()
		n, _ := s.AuditSize(ctx)
		recs, _ := s.AuditRecords(ctx, 0, n)
		seen := map[string]bool{}
		for i, b := range recs {
			r, err := kms.DecodeAuditRecord(b)
			if err != nil || r.Index != uint64(i) {
				t.Fatalf("record %d: %v %+v", i, err, r)
			}
			seen[r.Operation] = true
		}
		if n != 200 || len(seen) != 200 {
			t.Fatalf("%d records, %d distinct, want 200", n, len(seen))
		}
	})

	t.Run("Checkpoints", func(t *testing.T) {
		s := open(t)
		if _, _, err := s.LatestCheckpoint(ctx); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("no checkpoint yet: %v", err)
		}
		s.PutCheckpoint(ctx, 3, []byte("three"))
		s.PutCheckpoint(ctx, 10, []byte("ten"))
		n, note, err := s.LatestCheckpoint(ctx)
		if err != nil || n != 10 || string(note) != "ten" {
			t.Fatalf("latest: %d %q %v", n, note, err)
		}
	})
}

// MetaStore is the stores' own metadata, which kmsd keeps beside the keys
// (the KEK it sealed under).
type MetaStore interface {
	Meta(key string) ([]byte, error)
	PutMeta(key string, value []byte) error
	ClaimMeta(key string, value []byte) ([]byte, error)
}

// RunMeta checks a MetaStore: ClaimMeta sets a value once, whoever races,
// and every claimant learns the value that stands.
func RunMeta(t *testing.T, open func(t *testing.T) MetaStore) {
	t.Run("ClaimMeta", func(t *testing.T) {
		s := open(t)
		if v, err := s.Meta("sealed-under"); err != nil || v != nil {
			t.Fatalf("Meta of a new store = %q, %v", v, err)
		}
		var wg sync.WaitGroup
		got := make([][]byte, 8)
		errs := make([]error, 8)
		for i := range got {
			wg.Go(func() { got[i], errs[i] = s.ClaimMeta("sealed-under", fmt.Appendf(nil, "kek %d", i)) })
		}
		wg.Wait()
		won := 0
		for i := range got {
			if errs[i] != nil {
				t.Fatal(errs[i])
			}
			if !bytes.Equal(got[i], got[0]) {
				t.Fatalf("claimants saw %q and %q", got[0], got[i])
			}
			if bytes.Equal(got[i], fmt.Appendf(nil, "kek %d", i)) {
				won++
			}
		}
		if won != 1 {
			t.Fatalf("%d of 8 racing claims won, want 1", won)
		}
		if v, err := s.Meta("sealed-under"); err != nil || !bytes.Equal(v, got[0]) {
			t.Fatalf("Meta after the claims = %q, %v; want %q", v, err, got[0])
		}
		if v, err := s.ClaimMeta("sealed-under", []byte("late")); err != nil || !bytes.Equal(v, got[0]) {
			t.Fatalf("a late claim = %q, %v; want %q", v, err, got[0])
		}
		if err := s.PutMeta("sealed-under", []byte("set")); err != nil {
			t.Fatal(err)
		}
		if v, _ := s.Meta("sealed-under"); string(v) != "set" {
			t.Fatalf("PutMeta did not overwrite: %q", v)
		}
	})
}
