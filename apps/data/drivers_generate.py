"""Write ``drivers.csv``: the generated driver roster the rides app joins its trips with.

The TLC trip sample has no driver column, so ``apps.rides`` assigns each trip
a driver (``D000``..``D149``, a hash of its pickup time and zone) and this
script makes up those 150 drivers, with a seed so the file is the same every
time: each has a first row before March 2019, some change vehicle or rating
during the month, and a few retire (``active`` false: the table deletes them).
Times are New York local, like the trips'.

Run: ``python apps/data/drivers_generate.py`` (rewrites ``apps/data/drivers.csv``).
"""

from __future__ import annotations

import csv
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

FIRST = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatou",
    "Gus",
    "Hana",
    "Ivan",
    "Jo",
    "Kofi",
    "Lena",
    "Marco",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Vic",
    "Wen",
    "Yara",
    "Zoe",
]
LAST = [
    "Abreu",
    "Baker",
    "Cohen",
    "Diaz",
    "Evans",
    "Fox",
    "Garcia",
    "Haddad",
    "Ito",
    "Jones",
    "Kim",
    "Lopez",
    "Mensah",
    "Nowak",
    "Ortiz",
    "Patel",
    "Reyes",
    "Singh",
    "Tran",
    "Wong",
]
VEHICLES = [
    "Toyota Camry",
    "Toyota Prius",
    "Honda Accord",
    "Nissan Leaf",
    "Ford Escape",
    "Tesla Model 3",
    "Hyundai Sonata",
    "Kia Niro",
    "Chevrolet Malibu",
    "Lincoln MKT",
]
COLUMNS = ("driver_id", "updated", "name", "vehicle", "rating", "active")


def rows(seed: int = 16, drivers: int = 150) -> list[dict[str, str]]:
    """The roster's rows, sorted by update time."""
    rng = random.Random(seed)
    start, month = datetime(2019, 2, 1), timedelta(days=31)
    out: list[dict[str, Any]] = []
    for n in range(drivers):
        row: dict[str, Any] = {
            "driver_id": f"D{n:03d}",
            "updated": start + timedelta(seconds=rng.randrange(27 * 86_400)),
            "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "vehicle": rng.choice(VEHICLES),
            "rating": round(rng.uniform(4.2, 5.0), 2),
            "active": True,
        }
        out.append(dict(row))
        t = datetime(2019, 3, 1)
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            t = t + timedelta(seconds=rng.randrange(int(month.total_seconds()) // 3))
            if rng.random() < 0.5:
                row["vehicle"] = rng.choice(VEHICLES)
            row["rating"] = round(min(5.0, max(3.5, float(row["rating"]) + rng.gauss(0, 0.2))), 2)
            row["updated"] = t
            out.append(dict(row))
        if rng.random() < 0.04:
            row["active"] = False
            row["updated"] = t + timedelta(days=rng.randrange(1, 10))
            out.append(dict(row))
    out.sort(key=lambda r: (r["updated"], r["driver_id"]))
    return [
        {
            **r,
            "updated": f"{r['updated']:%Y-%m-%d %H:%M:%S}",
            "rating": f"{r['rating']:.2f}",
            "active": "true" if r["active"] else "false",
        }
        for r in out
    ]


if __name__ == "__main__":
    path = Path(__file__).with_name("drivers.csv")
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows())
    print(f"wrote {path}")
