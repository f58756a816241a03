// Package storetest is the conformance suite every kms.Store runs: the bbolt
// store now, a distributed one later.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"kmsd/kms"
)

func key(name string) *kms.Key {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	return &kms.Key{Name: name, Kind: "ml-dsa-65", CreatedAt: now, Primary: 1, MinDecryptionVersion: 1,
		Policy:   kms.Policy{DestroyWaitDays: 30},
		Versions: []kms.Version{{Number: 1, State: kms.StateEnabled, CreatedAt: now, PublicKey: []byte("pub"), Sealed: []byte("sealed")}}}
}

// Run runs the suite; open returns a new, empty store.
func Run(t *testing.T, open func(t *testing.T) kms.Store) {
	ctx := context.Background()

	t.Run("CreateGet", func(t *testing.T) {
		s := open(t)
		if err := s.CreateKey(ctx, key("a"), nil); err != nil {
			t.Fatal(err)
		}
		got, err := s.GetKey(ctx, "a")
		if err != nil || got.Name != "a" || string(got.Versions[0].Sealed) != "sealed" || !got.CreatedAt.Equal(key("a").CreatedAt) {
			t.Fatalf("GetKey: %+v %v", got, err)
		}
		if err := s.CreateKey(ctx, key("a"), nil); !errors.Is(err, kms.ErrAlreadyExists) {
			t.Fatalf("second CreateKey: %v", err)
		}
		if _, err := s.GetKey(ctx, "b"); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("GetKey of a missing key: %v", err)
		}
	})

	t.Run("GetReturnsACopy", func(t *testing.T) {
		s := open(t)
		s.CreateKey(ctx, key("a"), nil)
		k, _ := s.GetKey(ctx, "a")
		k.Versions[0].Sealed[0] = 'X'
		k.Primary = 9
		again, _ := s.GetKey(ctx, "a")
		if again.Primary != 1 || string(again.Versions[0].Sealed) != "sealed" {
			t.Fatal("changing a returned key changed the store")
		}
	})

	t.Run("UpdateCommitsOrNothing", func(t *testing.T) {
		s := open(t)
		s.CreateKey(ctx, key("a"), nil)
		boom := errors.New("boom")
		err := s.UpdateKey(ctx, "a", func(k *kms.Key) ([]*kms.AuditRecord, error) {
			k.Primary = 7
			k.Versions = append(k.Versions, kms.Version{Number: 2})
			return nil, boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("UpdateKey returned %v, want fn's error", err)
		}
		k, _ := s.GetKey(ctx, "a")
		if k.Primary != 1 || len(k.Versions) != 1 {
			t.Fatal("a failed update changed the key")
		}
		if err := s.UpdateKey(ctx, "a", func(k *kms.Key) ([]*kms.AuditRecord, error) { k.Primary = 2; return nil, nil }); err != nil {
			t.Fatal(err)
		}
		if k, _ := s.GetKey(ctx, "a"); k.Primary != 2 {
			t.Fatal("update lost")
		}
		if err := s.UpdateKey(ctx, "zz", func(*kms.Key) ([]*kms.AuditRecord, error) { return nil, nil }); !errors.Is(err, kms.ErrNotFound) {
			t.Fatalf("update of a missing key: %v", err)
		}
		if err := s.UpdateKey(ctx, "a", func(k *kms.Key) ([]*kms.AuditRecord, error) { k.Name = "b"; return nil, nil }); err == nil {
			t.Fatal("a key was renamed")
		}
	})

	t.Run("UpdatesSerialize", func(t *testing.T) {
		s := open(t)
		s.CreateKey(ctx, key("a"), nil)
		var wg sync.WaitGroup
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.UpdateKey(ctx, "a", func(k *kms.Key) ([]*kms.AuditRecord, error) {
					k.Versions = append(k.Versions, kms.Version{Number: k.Latest() + 1})
					return nil, nil
				})
			}()
		}
		wg.Wait()
		if k, _ := s.GetKey(ctx, "a"); len(k.Versions) != 21 {
			t.Fatalf("%d versions after 20 concurrent appends, want 21 (lost update)", len(k.Versions))
		}
	})

	t.Run("ListOrderAndPages", func(t *testing.T) {
		s := open(t)
		for _, n := range []string{"c", "a", "b", "d"} {
			s.CreateKey(ctx, key(n), nil)
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
		var recs []*kms.AuditRecord
		for i := 0; i < 5; i++ {
			r := rec(fmt.Sprintf("op%d", i))
			if err := s.AppendAudit(ctx, r); err != nil {
				t.Fatal(err)
			}
			if !r.Committed || r.Index != uint64(i) {
				t.Fatalf("record %d: committed %v index %d", i, r.Committed, r.Index)
			}
			recs = append(recs, r)
		}
		if n, _ := s.AuditSize(ctx); n != 5 {
			t.Fatalf("size %d", n)
		}
		got, err := s.AuditRecords(ctx, 1, 4)
		if err != nil || len(got) != 3 || string(got[0]) != string(recs[1].Encode()) {
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
		if err := s.CreateKey(ctx, key("a"), []*kms.AuditRecord{r}); err != nil || !r.Committed {
			t.Fatalf("create: %v %v", err, r.Committed)
		}
		// A failing change leaves neither the change nor its record.
		r2 := rec("update")
		err := s.UpdateKey(ctx, "a", func(k *kms.Key) ([]*kms.AuditRecord, error) {
			k.Primary = 5
			return []*kms.AuditRecord{r2}, errors.New("refused")
		})
		if err == nil || r2.Committed {
			t.Fatal("a refused update committed its record")
		}
		if n, _ := s.AuditSize(ctx); n != 1 {
			t.Fatalf("size %d after a refused update, want 1", n)
		}
		// A duplicate create appends nothing.
		if err := s.CreateKey(ctx, key("a"), []*kms.AuditRecord{rec("dup")}); err == nil {
			t.Fatal("duplicate create")
		}
		r3 := rec("update")
		if err := s.UpdateKey(ctx, "a", func(k *kms.Key) ([]*kms.AuditRecord, error) {
			k.Primary = 5
			return []*kms.AuditRecord{r3}, nil
		}); err != nil || !r3.Committed || r3.Index != 1 {
			t.Fatalf("update: %v %+v", err, r3)
		}
		if n, _ := s.AuditSize(ctx); n != 2 {
			t.Fatalf("size %d, want 2", n)
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
