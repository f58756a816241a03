package main

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
)

// BenchmarkThresholdKMSD is a threshold key among three kmsd processes on
// this machine (each its own data dir and SoftHSM token), over HTTPS on
// loopback with every peer message signed: the setup of a key (public,
// relinearization and power-of-two Galois keys; at node a, which
// coordinates) and a decryption by 2 and by 3 parties (t = 2 and t = 3
// keys) of a top-level ciphertext, as the SDK does it (ephemeral key,
// request, combination). Run with
// -bench ThresholdKMSD -benchtime 3x -run XXX ./cmd/kmsd/.
func BenchmarkThresholdKMSD(b *testing.B) {
	ctx := context.Background()
	nodes := thresholdNodes(b, "node-a", "node-b", "node-c")
	a := nodes[0]
	for _, preset := range []string{"ckks-logn14", "ckks-logn15"} {
		slots := map[string]int{"ckks-logn14": 1 << 13, "ckks-logn15": 1 << 14}[preset]
		var rot []int
		for r := 1; r < slots; r *= 2 {
			rot = append(rot, r)
		}
		i := 0
		b.Run(preset+"/setup", func(b *testing.B) {
			for b.Loop() {
				i++
				if _, err := a.admin.CreateKey(ctx, client.CreateKeyRequest{Name: fmt.Sprintf("bench-%s-%d", preset, i), Kind: "ckks", Policy: &client.Policy{
					Params: json.RawMessage(`"` + preset + `"`), Rotations: rot, Relinearization: true,
					Threshold: &client.ThresholdPolicy{Parties: []string{"node-a", "node-b", "node-c"}, T: 2}}}); err != nil {
					b.Fatal(err)
				}
			}
		})
		for _, tt := range []int{2, 3} {
			name := fmt.Sprintf("dec-%s-%d", preset, tt)
			if _, err := a.admin.CreateKey(ctx, client.CreateKeyRequest{Name: name, Kind: "ckks", Policy: &client.Policy{
				Params: json.RawMessage(`"` + preset + `"`), DecryptBudget: 1000,
				Threshold: &client.ThresholdPolicy{Parties: []string{"node-a", "node-b", "node-c"}, T: tt}}}); err != nil {
				b.Fatal(err)
			}
			f := &hekeys.Fetcher{BaseURL: a.p.url(), Token: a.token(b, "worker", name), IdentityKey: a.identity, CacheDir: b.TempDir(), HTTP: a.client(b, "").HTTPClient()}
			keys, err := f.FetchPublic(ctx, name, 1)
			if err != nil {
				b.Fatal(err)
			}
			env, err := keys.Encrypt([]float64{1, 2, 3})
			if err != nil {
				b.Fatal(err)
			}
			if err := hekeys.AttestInput(ctx, a.client(b, a.token(b, "encryptor", name)), env); err != nil {
				b.Fatal(err)
			}
			dec := a.client(b, a.token(b, "decryptor", name))
			b.Run(fmt.Sprintf("%s/decrypt-t%d", preset, tt), func(b *testing.B) {
				for b.Loop() {
					if _, err := hekeys.ThresholdDecrypt(ctx, dec, keys, env); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
