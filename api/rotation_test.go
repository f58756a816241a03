package api_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// TestRotationPeriodOverREST: rotation_period is set at creation and by
// PATCH (null and "" turn it off), next_rotation_time is in GET, list and
// PATCH answers (validated against openapi.yaml), and bad periods are 400
// problems that say why.
func TestRotationPeriodOverREST(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.admin)
	k, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "k", Kind: "ml-dsa-65", Policy: &client.Policy{RotationPeriod: "720h0m"}})
	if err != nil {
		t.Fatal(err)
	}
	if k.Policy.RotationPeriod != "720h" || k.NextRotationTime == nil || !k.NextRotationTime.Equal(k.Versions[0].CreatedAt.Add(720*time.Hour)) {
		t.Fatalf("created: period %q, next %v, version made %v", k.Policy.RotationPeriod, k.NextRotationTime, k.Versions[0].CreatedAt)
	}
	for _, c := range []struct{ period, want string }{
		{"30m", "below this server's minimum of 1h (kmsd --min-rotation-period)"},
		{"30d", "is not a duration"},
		{"soon", "is not a duration"},
		{"-2h", "must be positive"},
		{"0s", "must be positive"},
		{"100000h", "above the maximum"},
	} {
		body := fmt.Sprintf(`{"name":"bad","kind":"ml-kem-768","policy":{"rotation_period":%q}}`, c.period)
		st, _, b := e.raw("POST", "/v1/keys", e.admin, "application/json", body)
		if st != 400 || problemType(t, b) != "invalid-request" || !strings.Contains(string(b), c.want) {
			t.Errorf("rotation_period %q: %d %s, want 400 saying %q", c.period, st, b, c.want)
		}
	}
	if _, err := c.GetKey(ctx, "bad"); client.StatusOf(err) != 404 {
		t.Fatalf("a refused key exists: %v", err)
	}

	patch := func(policy string) client.Key {
		t.Helper()
		st, _, b := e.raw("PATCH", "/v1/keys/k", e.admin, "application/json", `{"policy":`+policy+`}`)
		if st != 200 {
			t.Fatalf("PATCH %s: %d %s", policy, st, b)
		}
		var k client.Key
		if err := json.Unmarshal(b, &k); err != nil {
			t.Fatal(err)
		}
		return k
	}
	if k2 := patch(`{"rotation_period":"48h"}`); k2.Policy.RotationPeriod != "48h" || !k2.NextRotationTime.Equal(k.Versions[0].CreatedAt.Add(48*time.Hour)) || k2.Policy.DestroyWaitDays != 30 {
		t.Fatalf("after PATCH 48h: %+v", k2)
	}
	if st, _, b := e.raw("PATCH", "/v1/keys/k", e.admin, "application/json", `{"policy":{"rotation_period":"1s"}}`); st != 400 || !strings.Contains(string(b), "minimum") {
		t.Fatalf("PATCH below the minimum: %d %s", st, b)
	}
	l, err := c.ListKeys(ctx, 100, "")
	if err != nil || len(l.Keys) != 1 || l.Keys[0].NextRotationTime == nil {
		t.Fatalf("list: %+v %v", l, err)
	}
	if k2 := patch(`{"rotation_period":null}`); k2.Policy.RotationPeriod != "" || k2.NextRotationTime != nil {
		t.Fatalf("after PATCH null: %+v", k2)
	}
	patch(`{"rotation_period":"2h"}`)
	if k2 := patch(`{"rotation_period":""}`); k2.Policy.RotationPeriod != "" || k2.NextRotationTime != nil {
		t.Fatalf("after PATCH \"\": %+v", k2)
	}
	if _, err := c.UpdateKey(ctx, "k", client.UpdateKeyRequest{Policy: &client.Policy{RotationPeriod: "3h"}}); err != nil {
		t.Fatal(err)
	}
	got, err := c.GetKey(ctx, "k")
	if err != nil || got.Policy.RotationPeriod != "3h" || got.NextRotationTime == nil {
		t.Fatalf("GET after the SDK's update: %+v %v", got, err)
	}
}

// TestScheduledRotationOfHEKeys: CKKS and BGV keys rotate on schedule
// through the generation path, one per round (so a burst of due keys does
// not take every generation slot from requests), in the background above
// the async threshold; each rotation is audited as the service's own,
// with the reason.
func TestScheduledRotationOfHEKeys(t *testing.T) {
	e := newEnv(t)
	for _, k := range []struct{ name, kind, params string }{{"c1", "ckks", "ckks-logn13"}, {"c2", "ckks", "ckks-logn13"}, {"b1", "bgv", "bgv-logn13"}} {
		heKey(t, e, k.name, fmt.Sprintf(`{"name":%q,"kind":%q,"policy":{"params":%q,"rotation_period":"1h"}}`, k.name, k.kind, k.params))
	}
	e.clock.Add(time.Hour)
	latest := func() (sum uint64) {
		for _, n := range []string{"c1", "c2", "b1"} {
			k, err := e.store.GetKey(ctx, n)
			if err != nil {
				t.Fatal(err)
			}
			sum += k.Latest
		}
		return sum
	}
	for round := 1; round <= 3; round++ {
		n, err := e.svc.RotateDue(ctx)
		if err != nil || n != 1 {
			t.Fatalf("round %d rotated %d keys (%v), want 1", round, n, err)
		}
		if got := latest(); got != uint64(3+round) {
			t.Fatalf("round %d: %d versions in all, want %d", round, got, 3+round)
		}
		if round < 3 {
			if st := e.svc.RotationStats(); st.OverdueKeys != 3-round || st.OldestOverdue != 0 {
				t.Fatalf("round %d: %+v", round, st)
			}
		}
	}
	if n, _ := e.svc.RotateDue(ctx); n != 0 {
		t.Fatalf("a fourth round rotated %d", n)
	}

	// Above the async threshold: in the background, then committed.
	testAsyncKeysetBytes = 1 << 20
	defer func() { testAsyncKeysetBytes = 0 }()
	e = newEnv(t)
	if st, _, b := e.raw("POST", "/v1/keys", e.admin, "application/json", `{"name":"big","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1,2,4,8],"relinearization":true,"rotation_period":"1h"}}`); st != 202 {
		t.Fatalf("create big: %d %s", st, b)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := e.store.GetKey(ctx, "big"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the key was not made in 30 s")
		}
	}
	e.clock.Add(2 * time.Hour)
	if n, err := e.svc.RotateDue(ctx); err != nil || n != 0 {
		t.Fatalf("async round: %d %v, want 0 (in the background)", n, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		k, err := e.store.GetKey(ctx, "big")
		if err != nil {
			t.Fatal(err)
		}
		if k.Latest == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the background rotation did not commit in 30 s")
		}
		// While it runs, a second round starts nothing more.
		if n, err := e.svc.RotateDue(ctx); err != nil || n != 0 {
			t.Fatalf("round during the generation: %d %v", n, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n, _ := e.svc.RotateDue(ctx); n != 0 {
		t.Fatal("rotated again after the background rotation")
	}
	if k, _ := e.store.GetKey(ctx, "big"); k.Latest != 2 {
		t.Fatalf("%d versions after one due period", k.Latest)
	}
	n, _ := e.store.Audit().AuditSize(ctx)
	recs, err := e.store.Audit().AuditRecords(ctx, 0, n)
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, b := range recs {
		r, _ := kms.DecodeAuditRecord(b)
		if r.Operation == kms.ScheduledRotationOp {
			if r.Actor != "system" || r.Key != "big" || r.Version != 2 || r.Status != 200 {
				t.Fatalf("record %s", b)
			}
			found++
		}
	}
	if found != 1 {
		t.Fatalf("%d scheduled-rotation records, want 1", found)
	}
}
